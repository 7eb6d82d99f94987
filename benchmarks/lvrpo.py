r"""LVRPO-stage benchmark: the step's phases, its throughput, prefix sharing.

  python benchmarks/lvrpo.py [--out=benchmarks/results/lvrpo.json] \
      [--steps=10] [--warmup=1] [--repeats=5]

Runs on the tiny preset with randomly initialized models (no checkpoints)
and the default config's `lvrpo` settings (configs/base.py), and writes:

step (the stage's real code, driven as `train_lvrpo` and `loop.run` drive
it: `lvrpo.Rollouts.prepare`, then the jitted, donated update step built by
`repeat_updates(make_train_step(...), mu)` and `compile_train_step` on a
one-device mesh; prompts from real world examples through the stage's
`UnderstandingPrompts` / `GenerationPrompts`); after `--warmup` compiling
steps, the mean over `--steps` steps of
  step_breakdown_s  seconds per phase: rollout, reward, reference (as
                    `prepare` logs them as time/rollout, time/reward,
                    time/reference), update (the interval it logs as
                    time/update: from the end of `prepare` to the finished
                    update) and other (the rest of the step: host-device
                    copies, dispatch);
  step_time_s       wall time of a whole step (prepare + update), and the
                    phases' fractions of it, the largest `dominant_phase`;
  samples_per_s     generation (images) and understanding (answers)
                    samples per second of step time: gen_batch_size and
                    und_batch_size per step, both tasks in every step.

train_transitions: the step again with the other choice of
`lvrpo.train_transitions` (all T transitions replayed, against half of
them: Flow-GRPO's timestep fraction), side by side: each one's
step_time_s and step_breakdown_s, and `speedup` (all / subset step time).

prefix_sharing (DESIGN §3): the replays of the loss, for the stage's batch
(B = batch / G prompts, G = group_size, N = B G samples), with the context
prefilled once per prompt and its cache repeated G times (`shared`:
`rollout.answer_logprobs`, `rollout.image_logprobs`) against the per-sample
reference (`per_sample`: every sample's whole [bos] [vit] [question]
[answer] through `understanding_logits`, inputs repeated G times; for
images `flow.replay_logprob` over `predict_velocity` on the prompts
repeated G times, i.e. the context recomputed for every sample and every
transition). Each is jitted as the forward (the log-probs) and the
forward+backward (jax.grad of the summed log-probs wrt the parameters):
  flops             XLA's count (`compiled.cost_analysis()`) of the
                    program with every lax.scan unrolled: XLA counts a loop
                    body once whatever its trip count, which would hide the
                    T transitions of the image replay;
  time_s            median wall time of `--repeats` calls after a warm-up;
  flops_ratio, time_ratio   per_sample / shared (> 1: sharing saves);
  max_abs_logp_diff the two computations' log-prob difference (float
                    error: they compute the same numbers).
Two cases: `world` (the world's 14-token questions and 16-token prompts)
and `long_context` (both left-padded to 64 tokens, a longer context per
sample as in BAGEL-sized prompts): the saving grows with the context.
`lm_token_ratio` is the ratio of language-model token positions computed
(no attention, ViT or head costs). In the image replay's forward XLA sees
that the per-sample prefill does not change across transitions and
computes it once per sample (loop-invariant code motion; CSE when
unrolled), so its forward ratio measures the sharing across the group only
(bound: `lm_token_ratio_context_once`); the backward cannot merge the
transitions' gradients through the prefill, so forward_backward pays for
the context at every transition.

Timings are of this machine; on a shared or busy CPU only the ratios mean
much. Takes a few minutes on 2 CPU cores, mostly compiling.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore

import report
from lvrpo_jax import allocator
from lvrpo_jax import sharding
from lvrpo_jax.models import dual_encoder
from lvrpo_jax.models import presets
from lvrpo_jax.models import sampling
from lvrpo_jax.models import unified
from lvrpo_jax.models import vae
from lvrpo_jax.rl import flow
from lvrpo_jax.rl import rewards
from lvrpo_jax.rl import rollout
from lvrpo_jax.train import lvrpo
from lvrpo_jax.train import lvrpo_prompts
from lvrpo_jax.train import lvrpo_schedule
from lvrpo_jax.train import optimizer
from lvrpo_jax.train import step as step_lib
from lvrpo_jax.world import dataset
from lvrpo_jax.world import examples
from lvrpo_jax.world import questions as questions_lib
from lvrpo_jax.world import tokenizer as tok

PHASES = ('rollout', 'reward', 'reference', 'update')
LONG_CONTEXT = 64


def _stack(rows):
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def prompt_batches(config, count: int) -> list[dict]:
  """`count` prompt batches of the stage, leaves [1, b, ...] (numpy).

  Understanding prompts from train examples, generation prompts from train
  examples with `heldout_fraction` of them held-out compositions (the
  stage's `MixedPrompts`), both through the stage's transforms.
  """
  c = config.lvrpo
  world = examples.WorldSpec.from_config(config.world, config.seed)
  und = c.und_batch_size * c.und_oversample // c.group_size
  gen = c.gen_batch_size // c.group_size
  records = lambda split, n: [
      dataset.record(examples.make_example(world, split, i))
      for i in range(n)]
  train = records('train', count * max(und, gen))
  mixed = lvrpo_prompts.MixedPrompts(
      train, records('heldout', count * gen), c.heldout_fraction)
  und_map = lvrpo_prompts.UnderstandingPrompts()
  gen_map = lvrpo_prompts.GenerationPrompts()
  batches = []
  for i in range(count):
    batch = {}
    if und:
      batch['und'] = _stack([und_map.map(train[i * und + j])
                             for j in range(und)])
    if gen:
      batch['gen'] = _stack([gen_map.map(mixed[i * gen + j])
                             for j in range(gen)])
    batches.append(jax.tree.map(lambda x: x[None], batch))
  return batches


# --- the stage's step --------------------------------------------------------


def bench_step(config, steps: int, warmup: int) -> dict:
  """Times `steps` steps of the stage's rollout + reward + reference +
  update after `warmup` steps (compiles)."""
  c = config.lvrpo
  ucfg, ae_cfg = presets.from_config(config.model)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  make_model = lambda: unified.UnifiedModel(ucfg,
                                            rngs=nnx.Rngs(config.seed))
  # The frozen reference and the policy start equal (the same seed), as
  # both start from the pretrain baseline in the stage.
  reference = make_model()
  model = sharding.init_sharded(make_model, mesh)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  tx = optimizer.make(optimizer.OptimizerConfig(
      learning_rate=c.learning_rate,
      warmup_steps=c.warmup_steps * c.num_updates,
      total_steps=c.steps * c.num_updates, weight_decay=c.weight_decay))
  state = step_lib.init_state(model, tx, config.seed)
  loss_fn = lambda m, b, r: lvrpo.lvrpo_loss(m, b, r, c=c)
  step_fn, (shardings, batch_sharding) = step_lib.compile_train_step(
      step_lib.repeat_updates(
          step_lib.make_train_step(graphdef, rest, loss_fn, tx),
          c.num_updates), state, tx, mesh)
  state = jax.device_put(state, shardings)

  ae = vae.LightAutoencoder(ae_cfg, rngs=nnx.Rngs(config.seed))
  rm = dual_encoder.DualEncoder(dual_encoder.tiny(),
                                rngs=nnx.Rngs(config.seed))
  scorer = rewards.Scorer(dict(c.rewards), dual_encoder=rm, judge=reference,
                          reward_errors=c.reward_errors)
  ref_graphdef, _, ref_rest = nnx.split(reference, nnx.Param, ...)
  rollouts = lvrpo.Rollouts(config, ref_graphdef, ref_rest, reference, ae,
                            scorer, batch_sharding)

  to_global = lambda batch: jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(batch_sharding, x),
      batch)
  timed, first_s, gaps = [], None, {}
  for i, local in enumerate(prompt_batches(config, warmup + steps)):
    batch = to_global(local)
    start = time.perf_counter()
    update, extra = rollouts.prepare(state, batch)
    state, metrics = step_fn(state, update)
    jax.block_until_ready((state, metrics))
    end = time.perf_counter()
    if i == 0:
      first_s = end - start
      # The first update replays the rollout: the gap is float error.
      gaps = {k: float(v) for k, v in metrics.items()
              if k.endswith('replay_gap')}
    if i >= warmup:
      timed.append({'rollout': extra['time/rollout'],
                    'reward': extra['time/reward'],
                    'reference': extra['time/reference'],
                    'update': end - rollouts.last_ready,
                    'step': end - start})
  mean = lambda k: float(np.mean([t[k] for t in timed]))
  breakdown = {p: mean(p) for p in PHASES}
  step_s = mean('step')
  breakdown['other'] = step_s - sum(breakdown.values())
  dominant = max(PHASES, key=breakdown.get)
  return {
      'settings': {k: c[k] for k in (
          'group_size', 'und_batch_size', 'gen_batch_size', 'sample_steps',
          'train_transitions', 'sde_window', 'num_updates', 'cfg_mode',
          'loss_agg', 'reward_norm', 'std_level', 'und_oversample',
          'gen_oversample', 'und_generated', 'und_generated_novel',
          'und_generated_paste', 'und_paste_contrast', 'heldout_fraction')},
      'rewards': {k: float(w) for k, w in c.rewards.items() if w},
      'steps': steps, 'warmup_steps': warmup,
      'first_step_s': first_s,
      'step_breakdown_s': breakdown,
      'step_time_s': step_s,
      'step_time_median_s': float(np.median([t['step'] for t in timed])),
      'phase_fraction': {p: breakdown[p] / step_s for p in PHASES},
      'dominant_phase': dominant,
      'samples_per_s': {
          'generation': c.gen_batch_size / step_s,
          'understanding': c.und_batch_size / step_s,
          'total': (c.gen_batch_size + c.und_batch_size) / step_s},
      'first_update_replay_gap': gaps,
      'final_loss': float(metrics['loss'])}


def bench_transitions(config, default: dict, steps: int,
                      warmup: int) -> dict:
  """The step with every transition replayed against half of them
  (`lvrpo.train_transitions`); `default` is bench_step of `config`, and
  the other choice is measured here."""
  c = config.lvrpo
  half = max(c.sample_steps // 2, 1)
  other = config.copy_and_resolve_references()
  subset_default = lvrpo_schedule.replays_subset(c)
  other.lvrpo.train_transitions = 0 if subset_default else half
  print(f'lvrpo step, train_transitions={other.lvrpo.train_transitions} '
        '...', flush=True)
  measured = bench_step(other, steps, warmup)
  keep = lambda r: {'train_transitions': r['settings']['train_transitions'],
                    'step_time_s': r['step_time_s'],
                    'step_breakdown_s': r['step_breakdown_s']}
  subset, full = ((default, measured) if subset_default
                  else (measured, default))
  return {'all': keep(full), 'subset': keep(subset),
          'speedup': full['step_time_s'] / subset['step_time_s']}


# --- prefix sharing ----------------------------------------------------------


def _eval_unrolled(jaxpr, consts, *args):
  """jax.core.eval_jaxpr, with every scan (also inside jits) unrolled."""
  env = {}
  read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    if eqn.primitive.name == 'scan':
      outputs = _unrolled_scan(eqn.params, inputs)
    elif eqn.primitive.name in ('jit', 'pjit'):
      inner = eqn.params['jaxpr']
      outputs = _eval_unrolled(inner.jaxpr, inner.consts, *inputs)
    else:
      with eqn.ctx.manager:
        outputs = eqn.primitive.bind(
            *inputs, **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outputs = [outputs]
    env.update(zip(eqn.outvars, outputs))
  return [read(v) for v in jaxpr.outvars]


def _unrolled_scan(params, inputs):
  body, consts = params['jaxpr'], params['num_consts']
  carries = params['num_carry']
  const_in = inputs[:consts]
  carry = inputs[consts:consts + carries]
  xs = inputs[consts + carries:]
  order = range(params['length'])
  ys = []
  for i in (reversed(order) if params['reverse'] else order):
    out = _eval_unrolled(body.jaxpr, body.consts, *const_in, *carry,
                         *[x[i] for x in xs])
    carry, y = out[:carries], out[carries:]
    ys.append(y)
  if params['reverse']:
    ys = ys[::-1]
  return list(carry) + [jnp.stack(y) for y in zip(*ys)]


def _has_scan(jaxpr) -> bool:
  return (any(e.primitive.name == 'scan' for e in jaxpr.eqns)
          or any(_has_scan(j) for j in jcore.subjaxprs(jaxpr)))


def unrolled(fn):
  """fn with its scans unrolled: the same numbers, and a program whose
  XLA cost analysis counts every iteration."""
  def run(*args):
    closed = jax.make_jaxpr(fn)(*args)
    out = _eval_unrolled(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(jax.eval_shape(fn, *args)),
                              out)
  return run


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan')))


def _measure(fn, args, repeats: int):
  """(XLA flops with scans unrolled, median seconds, the output) of
  jit(fn)(*args)."""
  compiled = jax.jit(fn).lower(*args).compile()
  flops = _flops(compiled)
  if _has_scan(jax.make_jaxpr(fn)(*args).jaxpr):
    flops = _flops(jax.jit(unrolled(fn)).lower(*args).compile())
  out = jax.block_until_ready(compiled(*args))  # Warm-up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return flops, float(np.median(times)), out


def _pad_left(ids, length: int):
  return jnp.pad(ids, ((0, 0), (length - ids.shape[1], 0)),
                 constant_values=tok.PAD)


def und_per_sample(model, pixels, questions, tokens, mask, *, group: int,
                   temperature: float):
  """`answer_logprobs` without sharing: every sample's whole sequence."""
  text = jnp.concatenate([jnp.repeat(questions, group, 0), tokens], 1)
  q, a = questions.shape[1], tokens.shape[1]
  # Text position i predicts text token i + 1.
  logits = model.understanding_logits(jnp.repeat(pixels, group, 0),
                                      text)[:, q - 1:q - 1 + a]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, -1)
  logp = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
  return jnp.where(mask, logp, 0.0)


def image_per_sample(model, prompts, states, next_states, *, group: int,
                     noise_level: float, cfg_mode: str, guidance: float):
  """`image_logprobs`' log-probs without sharing: `predict_velocity` (a
  prefill of the context and the latents on it) on every sample's prompt
  at every transition."""
  rows = jnp.repeat(prompts, group, 0)
  guided = flow.needs_unconditional(cfg_mode)

  def velocity_fn(x, t):
    v_cond = model.predict_velocity(rows, x, t)
    v_uncond = None
    if guided:
      v_uncond = model.predict_velocity(
          jnp.full_like(rows, model.config.pad), x, t)
    return flow.velocity_for_mode(v_cond, v_uncond, guidance, cfg_mode)

  steps = states.shape[1]
  logp, _, _ = flow.replay_logprob(
      velocity_fn, jnp.swapaxes(states, 0, 1),
      jnp.swapaxes(next_states, 0, 1),
      sampling.shifted_times(steps, model.config.timestep_shift),
      noise_level)
  return logp.T


def _compare(graphdef, rest, params, variants, inputs, repeats: int):
  """{'shared', 'per_sample', ratios} of two log-prob functions
  fn(model, inputs) -> [N, T]."""
  out, logps = {}, {}
  for name, fn in variants.items():
    forward = lambda p, x, fn=fn: fn(nnx.merge(graphdef, p, rest), x)
    backward = jax.grad(lambda p, x, f=forward: f(p, x).sum())
    fwd_flops, fwd_s, logps[name] = _measure(forward, (params, inputs),
                                             repeats)
    bwd_flops, bwd_s, _ = _measure(backward, (params, inputs), repeats)
    out[name] = {'forward': {'flops': fwd_flops, 'time_s': fwd_s},
                 'forward_backward': {'flops': bwd_flops, 'time_s': bwd_s}}
  shared, per_sample = out['shared'], out['per_sample']
  for key in ('flops', 'time_s'):
    out[key.split('_')[0] + '_ratio'] = {
        mode: per_sample[mode][key] / shared[mode][key]
        for mode in ('forward', 'forward_backward')}
  out['max_abs_logp_diff'] = float(jnp.max(jnp.abs(
      logps['shared'] - logps['per_sample'])))
  return out


def bench_prefix_sharing(config, repeats: int) -> dict:
  """Shared vs per-sample replays of one stage batch, two context lengths."""
  c = config.lvrpo
  g = c.group_size
  ucfg, _ = presets.from_config(config.model)
  graphdef, params, rest = nnx.split(
      unified.UnifiedModel(ucfg, rngs=nnx.Rngs(config.seed)), nnx.Param, ...)
  prompts = jax.tree.map(lambda x: jnp.asarray(x[0]),
                         prompt_batches(config, 1)[0])
  pixels = vae.from_uint8(prompts['und']['image'])
  image_kwargs = dict(group=g, noise_level=c.noise_level,
                      cfg_mode=c.cfg_mode, guidance=c.guidance)

  @jax.jit
  def sample(params, pixels, questions, gen_prompts, key):
    model = nnx.merge(graphdef, params, rest)
    n = questions.shape[0] * g
    answers = rollout.answer_rollout(
        model, pixels, questions, jax.random.split(key, n), group=g,
        num_tokens=questions_lib.ANSWER_TOKENS, temperature=c.temperature)
    images = rollout.image_rollout(
        model, gen_prompts,
        jax.random.split(jax.random.fold_in(key, 1),
                         gen_prompts.shape[0] * g),
        num_steps=c.sample_steps, **image_kwargs)
    return answers, images

  answers, images = sample(params, pixels, prompts['und']['question'],
                           prompts['gen']['prompt'], jax.random.key(0))
  # The reference reads padding as invalid: a sampled <pad> inside an
  # answer becomes another token (the same compute, comparable numbers).
  tokens = jnp.where(answers['mask'] & (answers['tokens'] == tok.PAD),
                     tok.EOS, answers['tokens'])
  und_variants = {
      'shared': lambda m, x: rollout.answer_logprobs(
          m, x['pixels'], x['question'], x['tokens'], x['mask'], group=g,
          temperature=c.temperature),
      'per_sample': lambda m, x: und_per_sample(
          m, x['pixels'], x['question'], x['tokens'], x['mask'], group=g,
          temperature=c.temperature)}
  gen_variants = {
      'shared': lambda m, x: rollout.image_logprobs(
          m, x['prompt'], x['states'], x['next_states'], **image_kwargs)[0],
      'per_sample': lambda m, x: image_per_sample(
          m, x['prompt'], x['states'], x['next_states'], **image_kwargs)}

  b, a = prompts['und']['question'].shape[0], tokens.shape[1]
  n, steps = b * g, c.sample_steps
  latents = ucfg.num_latent_tokens
  results = {}
  for case, length in (('world', None), ('long_context', LONG_CONTEXT)):
    question, prompt = prompts['und']['question'], prompts['gen']['prompt']
    if length:
      question, prompt = _pad_left(question, length), _pad_left(prompt,
                                                                length)
    print(f'  {case}: understanding ...', flush=True)
    context = 1 + ucfg.vit.num_patches + question.shape[1]
    und = _compare(graphdef, rest, params, und_variants, {
        'pixels': pixels, 'question': question, 'tokens': tokens,
        'mask': answers['mask']}, repeats)
    und.update(context_tokens=context, answer_tokens=a, prompts=b,
               samples=n, lm_token_ratio=n * (context + a) / (
                   b * context + n * a))
    print(f'  {case}: generation ...', flush=True)
    context = prompt.shape[1] + 2
    gen = _compare(graphdef, rest, params, gen_variants, {
        'prompt': prompt, 'states': images['states'],
        'next_states': images['next_states']}, repeats)
    gen.update(context_tokens=context, latent_tokens=latents,
               transitions=steps, prompts=b, samples=n,
               lm_token_ratio=n * steps * (context + latents) / (
                   b * context + n * steps * latents),
               lm_token_ratio_context_once=n * (context + steps * latents)
               / (b * context + n * steps * latents))
    results[case] = {'understanding': und, 'generation': gen}
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='benchmarks/results/lvrpo.json')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  config = report.default_config()
  results = {'machine': report.machine(backend=jax.default_backend(),
                                     devices=jax.device_count()),
             'model': config.model.preset}
  print('lvrpo step ...', flush=True)
  results.update(bench_step(config, args.steps, args.warmup))
  results['train_transitions'] = bench_transitions(config, results,
                                                   args.steps, args.warmup)
  print('prefix sharing ...', flush=True)
  results['prefix_sharing'] = bench_prefix_sharing(config, args.repeats)

  phases = ', '.join(f'{p} {results["step_breakdown_s"][p]:.3f}'
                     for p in PHASES + ('other',))
  rate = results['samples_per_s']
  print(f'step: {results["step_time_s"]:.3f} s ({phases}); '
        f'{results["dominant_phase"]} dominates '
        f'({results["phase_fraction"][results["dominant_phase"]]:.0%})')
  print(f'samples/s: generation {rate["generation"]:.1f}, '
        f'understanding {rate["understanding"]:.1f}')
  t = results['train_transitions']
  print(f'replaying {t["subset"]["train_transitions"]} of '
        f'{config.lvrpo.sample_steps} transitions: step '
        f'{t["subset"]["step_time_s"]:.3f} s vs {t["all"]["step_time_s"]:.3f}'
        f' s ({t["speedup"]:.2f}x)')
  print('prefix sharing, per-sample / shared (forward, forward+backward):')
  for case, tasks in results['prefix_sharing'].items():
    for task, r in tasks.items():
      f, t = r['flops_ratio'], r['time_ratio']
      print(f'  {case} {task} ({r["context_tokens"]} context tokens): '
            f'flops {f["forward"]:.2f}x, {f["forward_backward"]:.2f}x; '
            f'time {t["forward"]:.2f}x, {t["forward_backward"]:.2f}x')
  report.write(results, args.out)


if __name__ == '__main__':
  allocator.reexec()  # As the training job runs (lvrpo_jax/allocator.py).
  main()
