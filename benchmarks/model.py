r"""Model benchmark: the tiny preset's speed, side by side in one run.

  python benchmarks/model.py [--out=benchmarks/results/model.json] [--quick]

Writes JSON with four comparisons (each a ratio of two measurements taken
here, in the same process, on the same backend):
  train_step:   forward+backward tokens/s of the tiny text model, JAX vs the
                same-shaped transformers Qwen2 on torch (target ratio >= 1;
                skipped when torch/transformers are not installed);
  text_decode:  decoding tokens/s with the KV cache vs recomputing the full
                sequence every token, 64 new tokens (target >= 5x);
  image_sample: Euler sampling with the context prefilled once vs
                recomputed every step (target >= 2x); `token_bound` is the
                most caching can save in token-forwards, S (C + N) /
                (C + S N) for S steps, C context and N latent tokens;
  group_decode: G = 8 samples per prompt sharing one prefill vs prefilling
                each sample (prefill FLOPs ratio = G, and measured time);
  scan_layers:  compile time and step time of a 28-layer (BAGEL-7B's depth)
                tiny-width train step, layers unrolled vs scanned;
  remat:        each `model.remat_policy` against no remat, on an 8-layer
                tiny-width text model at 128 tokens: the activations kept
                for the backward pass, XLA's plan of the step's temporary
                memory (scheduler-dependent on a CPU), FLOPs and time.
Takes a few minutes on 2 CPU cores.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import report
from lvrpo_jax import metrics
from lvrpo_jax.models import mot
from lvrpo_jax.models import presets
from lvrpo_jax.models import sampling
from lvrpo_jax.models import transformer
from lvrpo_jax.models import unified


def _timed(fn, *args, repeats: int):
  """Median wall time of fn(*args) after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _text_model_loss(text, batch: int, length: int, seed: int):
  """(a MoT's mean next-token loss(state, tokens), its state, tokens
  [batch, length]) for the text config `text`."""
  graphdef, state = nnx.split(mot.MoT(text, rngs=nnx.Rngs(0)))
  tokens = jnp.asarray(np.random.default_rng(seed).integers(
      6, text.vocab_size, (batch, length)), jnp.int32)

  def loss(state, tokens):
    logits = nnx.merge(graphdef, state).text_logits(tokens)
    total, count = unified.text_loss(logits[:, :-1], tokens[:, 1:],
                                     jnp.ones_like(tokens[:, 1:]))
    return total / count

  return loss, state, tokens


def bench_train_step(cfg, batch: int, length: int, repeats: int) -> dict:
  text = cfg.text
  loss, state, tokens = _text_model_loss(text, batch, length, seed=0)
  jax_s = _timed(jax.jit(jax.grad(loss)), state, tokens, repeats=repeats)
  out = {'batch': batch, 'length': length,
         'jax_tokens_per_s': batch * length / jax_s}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    out['torch'] = 'skipped: torch/transformers not installed'
    return out
  # The reference runs where JAX runs: on the GPU when JAX has one.
  device = ('cuda' if jax.default_backend() == 'gpu'
            and torch.cuda.is_available() else 'cpu')
  torch.manual_seed(0)
  reference = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=text.vocab_size, hidden_size=text.hidden_size,
      intermediate_size=text.intermediate_size,
      num_hidden_layers=text.num_layers, num_attention_heads=text.num_heads,
      num_key_value_heads=text.num_kv_heads, head_dim=text.head_dim,
      max_position_embeddings=text.max_len)).train().to(device)
  torch_tokens = torch.tensor(np.asarray(tokens), dtype=torch.long,
                              device=device)

  def torch_step():
    reference.zero_grad()
    reference(torch_tokens, labels=torch_tokens).loss.backward()
    if device == 'cuda':
      torch.cuda.synchronize()  # CUDA kernels run asynchronously.

  torch_step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    torch_step()
    times.append(time.perf_counter() - start)
  torch_s = float(np.median(times))
  out.update(torch_tokens_per_s=batch * length / torch_s,
             torch_device=device, torch_version=torch.__version__,
             torch_threads=torch.get_num_threads(),
             ratio=torch_s / jax_s, target_ratio=1.0)
  return out


def bench_text_decode(cfg, prompt_len: int, new: int, repeats: int) -> dict:
  model = mot.MoT(cfg.text, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  prompt = jnp.asarray(np.random.default_rng(1).integers(
      6, cfg.text.vocab_size, (1, prompt_len)), jnp.int32)
  greedy = sampling.TextSampling(0.0)

  @jax.jit
  def cached(state, prompt):
    m = nnx.merge(graphdef, state)
    b, p = prompt.shape
    valid = jnp.ones((b, p), bool)
    hidden, cache = m(m.embed(prompt), mot.positions_of(valid),
                      jnp.zeros((b, p), jnp.int32), valid,
                      mot.init_cache(cfg.text, b, p + new), 0)
    return sampling.decode(m, cache, p, m.lm_logits(hidden)[:, -1],
                           jax.random.split(jax.random.key(0), b), new,
                           greedy, eos=-1)[0]

  @jax.jit
  def recomputed(state, prompt):
    # The same greedy tokens, the whole (fixed-length) sequence recomputed
    # for every new token, as a decoder without a cache must.
    m = nnx.merge(graphdef, state)
    b, p = prompt.shape
    seq = jnp.concatenate([prompt, jnp.zeros((b, new), jnp.int32)], 1)

    def step(seq, i):
      valid = jnp.arange(p + new)[None] < p + i
      logits = m.text_logits(seq, jnp.broadcast_to(valid, seq.shape))
      token = jnp.argmax(logits[:, p + i - 1], -1)
      return seq.at[:, p + i].set(token), token

    return jax.lax.scan(step, seq, jnp.arange(new))[1].T

  assert np.array_equal(cached(state, prompt), recomputed(state, prompt))
  cached_s = _timed(cached, state, prompt, repeats=repeats)
  recomputed_s = _timed(recomputed, state, prompt, repeats=repeats)
  return {'prompt_len': prompt_len, 'new_tokens': new,
          'cached_tokens_per_s': new / cached_s,
          'recomputed_tokens_per_s': new / recomputed_s,
          'speedup': recomputed_s / cached_s, 'target_speedup': 5.0}


def bench_image_sample(cfg, batch: int, prompt_len: int, steps: int,
                       guidance: float, repeats: int) -> dict:
  model = unified.UnifiedModel(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  prompts = jnp.asarray(np.random.default_rng(2).integers(
      6, cfg.text.vocab_size, (batch, prompt_len)), jnp.int32)
  noise = jax.random.normal(jax.random.key(0), (
      batch, cfg.latent_size, cfg.latent_size, cfg.latent_channels))

  def sampler(velocity):
    @jax.jit
    def run(state, prompts, noise):
      m = nnx.merge(graphdef, state)
      return sampling.sample_latents(velocity(m, prompts, guidance), noise,
                                     steps, cfg.timestep_shift)
    return run

  cached, recomputed = (sampler(sampling.cached_velocity),
                        sampler(sampling.recomputed_velocity))
  np.testing.assert_allclose(cached(state, prompts, noise),
                             recomputed(state, prompts, noise), atol=1e-4)
  cached_s = _timed(cached, state, prompts, noise, repeats=repeats)
  recomputed_s = _timed(recomputed, state, prompts, noise, repeats=repeats)
  context, latent = prompt_len + 2, cfg.num_latent_tokens
  return {'batch': batch, 'prompt_slot': prompt_len,
          'context_tokens': context, 'latent_tokens': latent, 'steps': steps,
          'token_bound': steps * (context + latent) / (context
                                                       + steps * latent),
          'guidance': guidance, 'cached_s': cached_s,
          'recomputed_s': recomputed_s,
          'speedup': recomputed_s / cached_s, 'target_speedup': 2.0}


def bench_group_decode(cfg, prompts: int, group: int, prompt_len: int,
                       new: int, repeats: int) -> dict:
  model = mot.MoT(cfg.text, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray(np.random.default_rng(3).integers(
      6, cfg.text.vocab_size, (prompts, prompt_len)), jnp.int32)
  settings = sampling.TextSampling(1.0)
  keys = jax.random.split(jax.random.key(0), prompts * group)

  def run(shared: bool):
    @jax.jit
    def go(state, tokens):
      m = nnx.merge(graphdef, state)
      rows = tokens if shared else jnp.repeat(tokens, group, 0)
      b, p = rows.shape
      valid = jnp.ones((b, p), bool)
      hidden, cache = m(m.embed(rows), mot.positions_of(valid),
                        jnp.zeros((b, p), jnp.int32), valid,
                        mot.init_cache(cfg.text, b, p + new), 0)
      last = m.lm_logits(hidden)[:, -1]
      if shared:
        cache = sampling.repeat_cache(cache, group)
        last = jnp.repeat(last, group, 0)
      return sampling.decode(m, cache, p, last, keys, new, settings)[0]
    return go

  shared, separate = run(True), run(False)
  assert np.array_equal(shared(state, tokens), separate(state, tokens))
  shared_s = _timed(shared, state, tokens, repeats=repeats)
  separate_s = _timed(separate, state, tokens, repeats=repeats)
  return {'prompts': prompts, 'group': group, 'prompt_len': prompt_len,
          'new_tokens': new, 'prefill_flops_ratio': float(group),
          'shared_s': shared_s, 'separate_s': separate_s,
          'speedup': separate_s / shared_s}


def bench_scan_layers(cfg, layers: int, repeats: int) -> dict:
  """Compile and step time of a deep text model's gradient step, with the
  layers unrolled and with them stacked and scanned."""
  out = {'layers': layers}
  for scan in (False, True):
    loss, state, tokens = _text_model_loss(dataclasses.replace(
        cfg.text, num_layers=layers, scan_layers=scan), 8, 64, seed=4)
    start = time.perf_counter()
    step = jax.jit(jax.grad(loss)).lower(state, tokens).compile()
    name = 'scanned' if scan else 'unrolled'
    out[f'{name}_compile_s'] = time.perf_counter() - start
    out[f'{name}_step_s'] = _timed(step, state, tokens, repeats=repeats)
  out['compile_speedup'] = out['unrolled_compile_s'] / out['scanned_compile_s']
  out['step_ratio'] = out['unrolled_step_s'] / out['scanned_step_s']
  return out


def bench_remat(cfg, layers: int, batch: int, length: int,
                repeats: int) -> dict:
  """Per `model.remat_policy` (and without remat) on a gradient step:
  saved_bytes, the activations jax.grad keeps for the backward pass
  (`metrics.saved_residuals`, inputs and parameters left out): what the
  policy decides; xla_temp_bytes, XLA's plan of the step's temporary
  memory (`memory_analysis`), which also depends on XLA's scheduling;
  the FLOPs (`cost_analysis`: the recomputation shows) and the time."""
  out = {'layers': layers, 'batch': batch, 'length': length}
  for policy in ('none',) + tuple(transformer.REMAT_POLICIES):
    text = dataclasses.replace(cfg.text, num_layers=layers, max_len=length,
                               remat=policy != 'none',
                               remat_policy='full' if policy == 'none'
                               else policy)
    loss, state, tokens = _text_model_loss(text, batch, length, seed=5)
    saved = metrics.saved_residuals(lambda s: loss(s, tokens), state)
    step = jax.jit(jax.grad(loss)).lower(state, tokens).compile()
    cost = step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out[policy] = {
        'saved_bytes': sum(n for n, what in saved
                           if not what.startswith('from the argument')),
        'xla_temp_bytes': int(step.memory_analysis().temp_size_in_bytes),
        'flops': float(cost['flops']),
        'step_s': _timed(step, state, tokens, repeats=repeats)}
  for policy in transformer.REMAT_POLICIES:
    for key in ('saved_bytes', 'xla_temp_bytes', 'flops', 'step_s'):
      out[policy][f'{key}_vs_none'] = out[policy][key] / out['none'][key]
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='benchmarks/results/model.json')
  parser.add_argument('--quick', action='store_true')
  args = parser.parse_args()
  repeats = 3 if args.quick else 10
  cfg, _ = presets.tiny()
  results = {'machine': report.machine(backend=jax.default_backend(),
                                     devices=jax.device_count()),
             'model': 'tiny', 'quick': args.quick}
  print('train step ...', flush=True)
  results['train_step'] = bench_train_step(cfg, 16, 64, repeats)
  print('text decode ...', flush=True)
  results['text_decode'] = bench_text_decode(cfg, 16, 64, repeats)
  print('image sample ...', flush=True)
  # The world's prompts fit a 16-token slot; a 48-token slot shows how the
  # saving grows with the context (the bound is (context + N) / N).
  # 10 steps as LVRPO's rollouts, 20 as eval's sampler (configs/base.py).
  results['image_sample'] = bench_image_sample(cfg, 8, 16, 10, 1.0, repeats)
  results['image_sample_20_steps'] = bench_image_sample(cfg, 8, 16, 20, 1.0,
                                                        repeats)
  results['image_sample_cfg'] = bench_image_sample(cfg, 8, 16, 10, 3.0,
                                                   repeats)
  results['image_sample_long_prompt'] = bench_image_sample(cfg, 8, 48, 10,
                                                           1.0, repeats)
  print('group decode ...', flush=True)
  results['group_decode'] = bench_group_decode(cfg, 2, 8, 48, 16, repeats)
  print('scan layers ...', flush=True)
  results['scan_layers'] = bench_scan_layers(cfg, 28, repeats)
  print('remat policies ...', flush=True)
  results['remat'] = bench_remat(cfg, 8, 8, 128, repeats)
  for key in ('train_step', 'text_decode', 'image_sample',
              'image_sample_20_steps', 'image_sample_cfg',
              'image_sample_long_prompt', 'group_decode', 'scan_layers'):
    r = results[key]
    value = r.get('ratio', r.get('speedup', r.get('compile_speedup')))
    print(f'  {key}: {value}', flush=True)
  for policy in transformer.REMAT_POLICIES:
    r = results['remat'][policy]
    print(f'  remat {policy}: activations kept '
          f'{r["saved_bytes_vs_none"]:.2f}x, '
          f'FLOPs {r["flops_vs_none"]:.2f}x, time {r["step_s_vs_none"]:.2f}x'
          ' of no remat', flush=True)
  report.write(results, args.out)


if __name__ == '__main__':
  main()
