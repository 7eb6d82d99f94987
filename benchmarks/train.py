r"""Training-step benchmark: step time, throughput and FLOPs per stage.

  python benchmarks/train.py [--out=benchmarks/results/train.json] [--steps=20]
      [--cases=vae,pretrain]

For each training stage (vae, reward_model, pretrain) jits the real train
step of `lvrpo_jax.train.step` with the stage's own loss on the tiny preset
at the default batch size (synthetic inputs of the right shapes) and writes:
median step time, examples/s, tokens/s where tokens are defined (the
unified model), and the step's FLOPs from XLA's cost analysis of the
compiled step. The reward model and the unified model are also measured
with bf16 compute (`model.dtype='bfloat16'`: float32 master weights),
side by side, with the float32 / bf16 step-time ratio (> 1: bf16 faster;
on a CPU bf16 matmuls are emulated, so expect < 1 there). Each case also
records the process's user and system CPU time per step. Like the training
job, it runs under mimalloc where `lvrpo_jax.allocator` can preload it
(`benchmarks/allocator.py` compares the two allocators).
"""

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import report
from lvrpo_jax import allocator
from lvrpo_jax.models import dual_encoder
from lvrpo_jax.models import presets
from lvrpo_jax.models import unified
from lvrpo_jax.models import vae
from lvrpo_jax.train import autoencoder
from lvrpo_jax.train import optimizer
from lvrpo_jax.train import pretrain
from lvrpo_jax.train import reward_model
from lvrpo_jax.train import step as step_lib


def _cases(batch: int, dtype: str = 'float32'):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
  ucfg, ae_cfg = presets.tiny()
  ucfg = presets.with_dtype(ucfg, dtype)
  rm_cfg = dual_encoder.with_dtype(dual_encoder.tiny(), dtype)
  v = ucfg.text.vocab_size
  text_len, prompt_len = pretrain.TEXT_LEN, pretrain.PROMPT_LEN
  pretrain_batch = {
      'index': jnp.arange(batch, dtype=jnp.int32),
      'image': jnp.asarray(images),
      'text': jnp.asarray(rng.integers(6, v, (batch, text_len)), jnp.int32),
      'target': jnp.ones((batch, text_len), jnp.int32),
      'prompt': jnp.asarray(rng.integers(6, v, (batch, prompt_len)),
                            jnp.int32)}
  ae = vae.LightAutoencoder(ae_cfg, rngs=nnx.Rngs(0))
  encode = lambda pixels: ae.normalize_latents(ae.encode(pixels)[0])
  captions = jnp.asarray(rng.integers(6, v, (batch, 16)), jnp.int32)
  seq = 1 + ucfg.vit.num_patches + text_len + (
      2 + prompt_len + ucfg.num_latent_tokens)
  return {
      'vae': (lambda: vae.LightAutoencoder(ae_cfg, rngs=nnx.Rngs(0)),
              lambda m, b, r: autoencoder.vae_loss(
                  m, b, r, kl_weight=1e-6, latent_noise=0.1),
              {'image': jnp.asarray(images)}, None),
      'reward_model': (
          lambda: dual_encoder.DualEncoder(rm_cfg, rngs=nnx.Rngs(0)),
          reward_model.rm_loss, {'image': jnp.asarray(images),
                                 'caption': captions}, None),
      'pretrain': (
          lambda: unified.UnifiedModel(ucfg, rngs=nnx.Rngs(0)),
          lambda m, b, r: pretrain.pretrain_loss(
              m, b, r, encode=encode, flow_weight=1.0, prompt_dropout=0.1),
          pretrain_batch, batch * seq),
  }


def bench(make_model, loss_fn, batch, tokens, steps: int) -> dict:
  tx = optimizer.make(optimizer.OptimizerConfig(warmup_steps=1,
                                                total_steps=10 * steps))
  model = make_model()
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  state = step_lib.init_state(model, tx, 0)
  train_step = jax.jit(step_lib.make_train_step(graphdef, rest, loss_fn, tx),
                       donate_argnums=(0,))
  micro = step_lib.micro_batches(batch, 1)
  compiled = train_step.lower(state, micro).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state, metrics = train_step(state, micro)  # Warm-up.
  jax.block_until_ready(metrics)
  times = []
  before = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = train_step(state, micro)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  after = resource.getrusage(resource.RUSAGE_SELF)
  step_s = float(np.median(times))
  examples = jax.tree.leaves(batch)[0].shape[0]
  out = {'batch': examples, 'step_time_s': step_s,
         'examples_per_s': examples / step_s,
         'user_cpu_s_per_step': (after.ru_utime - before.ru_utime) / steps,
         'system_cpu_s_per_step': (after.ru_stime - before.ru_stime) / steps,
         'flops_per_step': float(cost.get('flops', float('nan')))}
  if tokens:
    out.update(tokens_per_step=tokens, tokens_per_s=tokens / step_s)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='benchmarks/results/train.json')
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--cases', default='',
                      help='comma-separated cases to run (default: all)')
  args = parser.parse_args()
  results = {'machine': report.machine(backend=jax.default_backend(),
                                     devices=jax.device_count()),
             'model': 'tiny'}
  cases = _cases(args.batch)
  half = _cases(args.batch, 'bfloat16')
  cases.update({f'{name}_bf16': half[name]
                for name in ('reward_model', 'pretrain')})
  if args.cases:
    unknown = set(args.cases.split(',')) - set(cases)
    if unknown:
      parser.error(f'unknown cases {sorted(unknown)}; known: {list(cases)}')
    cases = {name: cases[name] for name in args.cases.split(',')}
  for name, (make, loss, batch, tokens) in cases.items():
    print(f'{name} ...', flush=True)
    results[name] = bench(make, loss, batch, tokens, args.steps)
    print(f"  {results[name]['step_time_s'] * 1e3:.1f} ms/step, "
          f"{results[name]['flops_per_step'] / 1e9:.2f} GFLOP/step",
          flush=True)
  results['bf16_speedup'] = {
      name: results[name]['step_time_s'] / results[f'{name}_bf16'][
          'step_time_s'] for name in ('reward_model', 'pretrain')
      if name in results and f'{name}_bf16' in results}
  report.write(results, args.out)


if __name__ == '__main__':
  allocator.reexec()  # As the training job runs (lvrpo_jax/allocator.py).
  main()
