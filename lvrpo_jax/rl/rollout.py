"""Group rollouts and their replays: G samples per prompt, one prefill.

Understanding: [bos] [vit] [question] is prefilled once per prompt, its
cache repeated G times (`sampling.repeat_cache`), and G answers decoded
with their log-probs. Generation: [bos] [prompt] [boi] is prefilled once
per prompt (with the all-padding unconditional context beside it when
`cfg_mode='guided'`), and G latents run the Flow-GRPO SDE
(`flow.sde_rollout`) on that cache, recording every transition.

The replays (`answer_logprobs`, `image_logprobs`) recompute the same
log-probs under other parameters (the policy being trained, the frozen
reference) from the same shared-prefix layout: the context is computed once
per prompt and its gradient sums over the group's G samples (DESIGN §3), and
at unchanged parameters they reproduce the rollout's numbers.

Sample n = b * G + g is prompt b's g-th sample. Shapes: B prompts, G group,
N = B G samples, Q question tokens, P prompt tokens, T answer tokens or
denoising transitions, h x w x C latents.
"""

import jax
import jax.numpy as jnp

from lvrpo_jax.models import mot as mot_lib
from lvrpo_jax.models import sampling
from lvrpo_jax.models import unified
from lvrpo_jax.rl import flow


def _prefill_question(model: unified.UnifiedModel, pixels_bhwc, questions_bq,
                      group: int, extra_slots: int):
  """The [bos] [vit] [question] context of each prompt, prefilled once and
  repeated G times: (cache [N rows], context length, last logits [N, V])."""
  x, positions, segments, valid = model.understanding_sequence(pixels_bhwc,
                                                               questions_bq)
  b, t = x.shape[:2]
  hidden, cache = model.mot(
      x, positions, segments, valid,
      mot_lib.init_cache(model.config.text, b, t + extra_slots), 0)
  last = model.mot.lm_logits(hidden[:, -1])
  return (sampling.repeat_cache(cache, group), t,
          jnp.repeat(last, group, axis=0))


def answer_rollout(model: unified.UnifiedModel, pixels_bhwc, questions_bq,
                   keys_n, *, group: int, num_tokens: int,
                   temperature: float):
  """G sampled answers per (image, question).

  Args:
    pixels_bhwc: [B, H, W, 3] images in [-1, 1]; questions_bq: [B, Q]
      left-padded question tokens.
    keys_n: [N] one key per sample.
    group: G; num_tokens: T, answer tokens sampled (with <eos>).
    temperature: of the sampling distribution (no top-k / top-p: the
      replay must be able to recompute every log-prob).

  Returns:
    {'tokens' [N, T], 'logp' [N, T] (0 after <eos>), 'mask' [N, T] (True
    on the answer's tokens up to and including <eos>)}.
  """
  cache, context_len, last = _prefill_question(model, pixels_bhwc,
                                               questions_bq, group,
                                               num_tokens)
  tokens, logp, done = sampling.decode(
      model.mot, cache, context_len, last, keys_n, num_tokens,
      sampling.TextSampling(temperature=temperature))
  return {'tokens': tokens, 'logp': logp, 'mask': ~done}


def answer_logprobs(model: unified.UnifiedModel, pixels_bhwc, questions_bq,
                    tokens_nt, mask_nt, *, group: int, temperature: float):
  """log pi(answer token | image, question, earlier tokens) [N, T].

  One teacher-forced pass over the answers on the shared, once-per-prompt
  context; masked positions give 0. Equals `answer_rollout`'s `logp` at the
  parameters that sampled.
  """
  num_tokens = tokens_nt.shape[1]
  cache, context_len, last = _prefill_question(model, pixels_bhwc,
                                               questions_bq, group,
                                               num_tokens)
  # Positions continue after the context's valid tokens, as in decoding.
  start = mot_lib.next_position(cache, context_len)
  positions = start[:, None] + jnp.arange(num_tokens, dtype=jnp.int32)
  hidden, _ = model.mot(model.mot.embed(tokens_nt), positions,
                        jnp.zeros(tokens_nt.shape, jnp.int32), mask_nt,
                        cache, context_len)
  logits = jnp.concatenate(
      [last[:, None], model.mot.lm_logits(hidden[:, :-1])], axis=1)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, -1)
  logp = jnp.take_along_axis(logp, tokens_nt[..., None], axis=-1)[..., 0]
  return jnp.where(mask_nt, logp, 0.0)


def _group_velocity(model: unified.UnifiedModel, prompts_bp, group: int,
                    cfg_mode: str, guidance: float | sampling.Guidance,
                    context_grad: bool = True):
  """velocity_fn(x [N, ...], t [N]) on one context prefill per prompt: the
  velocity `cfg_mode` samples with (flow.velocity_for_mode). Without
  `context_grad` no gradient reaches the context (the prompt's `und`
  expert pass): only the `gen` expert and the latent layers learn."""
  guided = flow.needs_unconditional(cfg_mode)
  prompts = prompts_bp
  if guided:
    prompts = jnp.concatenate(
        [prompts_bp, jnp.full_like(prompts_bp, model.config.pad)])
  cache, context_len = model.prefill_context(
      prompts, extra_slots=model.config.num_step_tokens)
  if not context_grad:
    cache = jax.lax.stop_gradient(cache)
  cache = sampling.repeat_cache(cache, group)

  def velocity_fn(x, t):
    if not guided:
      v = model.velocity_from_cache(cache, context_len, x, t)
      return flow.velocity_for_mode(v, None, guidance, cfg_mode)
    v = model.velocity_from_cache(cache, context_len,
                                  jnp.concatenate([x, x]),
                                  jnp.concatenate([t, t]))
    v_cond, v_uncond = jnp.split(v, 2)
    return flow.velocity_for_mode(v_cond, v_uncond, guidance, cfg_mode, t)

  return velocity_fn


def _time_major(x):
  return jnp.swapaxes(x, 0, 1)


def image_rollout(model: unified.UnifiedModel, prompts_bp, keys_n, *,
                  group: int, num_steps: int, noise_level: float,
                  cfg_mode: str, guidance: float | sampling.Guidance,
                  sde_steps=None):
  """G latents per prompt by the SDE sampler, every transition recorded.

  Args:
    prompts_bp: [B, P] left-padded prompt tokens.
    keys_n: [N] one key per sample: its initial noise and every step's.
    group: G; num_steps: T transitions over the model's shifted schedule.
    noise_level: a of the SDE (flow.sde_std).
    cfg_mode, guidance: the velocity sampled with (flow.CFG_MODES).
    sde_steps: optional [T] bools (`flow.sde_rollout`): False steps are
      deterministic ODE steps with logp 0. Default: all SDE.

  Returns:
    {'latents' [N, h, w, C] (t = 0), 'states' / 'next_states'
    [N, T, h, w, C] (x_t before / after each transition), 'logp' [N, T]
    (per-dimension transition log-probs)}.
  """
  cfg = model.config
  shape = (cfg.latent_size, cfg.latent_size, cfg.latent_channels)

  def noise(key):  # x_1 [h, w, C] and each step's z [T, h, w, C].
    init_key, steps_key = jax.random.split(key)
    return (jax.random.normal(init_key, shape),
            jax.random.normal(steps_key, (num_steps,) + shape))

  init, steps = jax.vmap(noise)(keys_n)
  out = flow.sde_rollout(
      _group_velocity(model, prompts_bp, group, cfg_mode, guidance), init,
      _time_major(steps),
      sampling.shifted_times(num_steps, cfg.timestep_shift), noise_level,
      sde_steps=sde_steps)
  return {'latents': out['latents'],
          'states': _time_major(out['states']),
          'next_states': _time_major(out['next_states']),
          'logp': out['logp'].T}


def select_transitions(out, steps_nk):
  """An `image_rollout` output cut down to the K transitions `steps_nk`
  [N, K] names for each sample (`flow.transition_subsets`): 'states',
  'next_states' [N, K, h, w, C] and 'logp' [N, K], plus 'steps' itself,
  which `image_logprobs` then replays."""
  take = lambda x: jax.vmap(lambda row, i: row[i])(x, steps_nk)
  return {**out, 'states': take(out['states']),
          'next_states': take(out['next_states']), 'logp': take(out['logp']),
          'steps': steps_nk}


def image_logprobs(model: unified.UnifiedModel, prompts_bp, states_nt,
                   next_states_nt, *, group: int, noise_level: float,
                   cfg_mode: str, guidance: float | sampling.Guidance,
                   context_grad: bool = True, num_steps: int | None = None,
                   steps_nk=None):
  """The recorded transitions' log-probs and means under `model`.

  Args:
    prompts_bp: [B, P]; states_nt, next_states_nt: [N, T, h, w, C] from
      `image_rollout`, or [N, K, h, w, C] from `select_transitions`.
    context_grad: let the gradient reach the prompt's context (its sum over
      the group); False stops it there (`_group_velocity`).
    num_steps: the rollout's T; needed only with `steps_nk`.
    steps_nk: [N, K] which transitions the states are (`select_transitions`
      'steps'); only those are replayed.

  Returns:
    (logp [N, T], means [N, T, h, w, C], stds [N, T]), or K in place of T
    with `steps_nk`: the Gaussian of each transition (its std depends on
    the schedule only).
  """
  if steps_nk is None:
    num_steps = states_nt.shape[1]
  elif num_steps is None:
    raise ValueError('steps_nk needs the rollout\'s num_steps')
  logp, means, stds = flow.replay_logprob(
      _group_velocity(model, prompts_bp, group, cfg_mode, guidance,
                      context_grad),
      _time_major(states_nt), _time_major(next_states_nt),
      sampling.shifted_times(num_steps, model.config.timestep_shift),
      noise_level,
      steps_tb=None if steps_nk is None else _time_major(steps_nk))
  return (logp.T, _time_major(means),
          jnp.broadcast_to(stds.T if stds.ndim == 2 else stds, logp.T.shape))
