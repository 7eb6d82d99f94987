"""Flow-matching transitions as Gaussians: the SDE sampler of Flow-GRPO.

Rectified flow (models/unified.py): x_t = (1 - t) x_0 + t eps, the model
predicts v = eps - x_0, sampling runs from t = 1 (noise) to t = 0 over
`sampling.shifted_times`. One transition t -> t' has dt = t' - t < 0.

ODE (evaluation):  x_t' = x_t + v dt.
SDE (rollouts, Flow-GRPO, Liu et al. 2025; DESIGN §5), the reverse-time SDE
with the ODE's marginals, discretized by Euler-Maruyama:
  sigma_t = a sqrt(t / (1 - t)),                 a = noise_level,
  mu      = x_t + [v + sigma_t^2 / (2 t) (x_t + (1 - t) v)] dt,
  s       = sigma_t sqrt(|dt|),
  x_t'    = mu + s z,                            z ~ N(0, I).
(x_t + (1 - t) v is the model's estimate of eps, and -eps / t is the score,
so the bracket is v - sigma_t^2 / 2 * score.) sigma_t is infinite at t = 1;
there the denominator uses t' instead (as Flow-GRPO does).

So each transition is N(mu, s^2 I) and has a log-density; its KL to the
reference policy's N(mu_ref, s^2 I) is ||mu - mu_ref||^2 / (2 s^2). Both are
reported per dimension (averaged over the D non-batch elements): see
`transition_logprob`.

Shapes: B batch, T transitions, [B, ...] latents (e.g. [B, h, w, C]).
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp

from lvrpo_jax.models import sampling

CFG_MODES = ('none', 'guided', 'cond_only')


def _over(t, x):
  """t (a scalar or [B]) shaped to broadcast against x [B, ...]."""
  t = jnp.asarray(t)
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim)) if t.ndim else t


def _mean_over_elements(x_b):
  """[B, ...] -> [B]: the mean over the non-batch elements."""
  return jnp.mean(x_b, axis=tuple(range(1, x_b.ndim)))


def sde_std(t, t_next, noise_level):
  """The SDE's diffusion sigma_t and the transition's std s.

  Args:
    t, t_next: times, scalars or [B]; t_next < t.
    noise_level: a, the SDE's noise scale (Flow-GRPO uses 0.7).

  Returns:
    (sigma_t, s), shaped like t: sigma_t = a sqrt(t / (1 - t_den)) with
    t_den = t_next where t >= 1 (sigma would be infinite there) else t, and
    s = sigma_t sqrt(|t_next - t|).
  """
  t, t_next = jnp.asarray(t, jnp.float32), jnp.asarray(t_next, jnp.float32)
  t_den = jnp.where(t >= 1.0, t_next, t)
  sigma_t = noise_level * jnp.sqrt(t / (1.0 - t_den))
  return sigma_t, sigma_t * jnp.sqrt(jnp.abs(t_next - t))


def sde_mean(x_t, v, t, t_next, sigma_t):
  """The transition's mean mu [B, ...] (module docstring), dt = t_next - t.

  x_t, v: latents and velocity [B, ...]; t, t_next, sigma_t: scalars or [B],
  t > 0.
  """
  t, dt, sigma_t = _over(t, x_t), _over(t_next - t, x_t), _over(sigma_t, x_t)
  drift = v + sigma_t**2 / (2.0 * t) * (x_t + (1.0 - t) * v)
  return x_t + drift * dt


def sde_step(x_t, v, t, t_next, noise_level, noise):
  """One SDE transition x_next = mu + s z: (x_next, mu, s).

  x_t, v, noise: [B, ...], noise z ~ N(0, I) drawn by the caller (so
  rollouts replay from their keys); t, t_next: scalars or [B]; s is shaped
  like t.
  """
  sigma_t, std = sde_std(t, t_next, noise_level)
  mean = sde_mean(x_t, v, t, t_next, sigma_t)
  return mean + _over(std, x_t) * noise, mean, std


def ode_step(x_t, v, t, t_next):
  """The Euler ODE step x_t + (t_next - t) v; [B, ...]."""
  return x_t + _over(t_next - t, x_t) * v


def transition_logprob(x_next, mean, std):
  """log N(x_next; mean, std^2 I) per dimension; [B].

  The mean over the D non-batch elements of
    -(x - mu)^2 / (2 s^2) - log s - log(2 pi) / 2,
  i.e. the exact log-density divided by D (as Flow-GRPO does). On this scale
  the ratio exp(logp - logp_old) of a whole latent stays near 1, so PPO
  clipping acts on it rather than on an exponent D times larger.

  Args:
    x_next, mean: [B, ...].
    std: s, a scalar or [B].
  """
  x, mean = x_next.astype(jnp.float32), mean.astype(jnp.float32)
  std = _over(jnp.asarray(std, jnp.float32), x)
  logp = (-jnp.square(x - mean) / (2.0 * jnp.square(std)) - jnp.log(std)
          - 0.5 * math.log(2.0 * math.pi))
  return _mean_over_elements(logp)


def velocity_kl(mean, ref_mean, std):
  """KL(N(mean, s^2 I) || N(ref_mean, s^2 I)) per dimension; [B].

  ||mean - ref_mean||^2 / (2 s^2) averaged over the D non-batch elements
  (the scale of `transition_logprob`).

  Args:
    mean, ref_mean: the policy's and the reference's means [B, ...].
    std: s, a scalar or [B].
  """
  diff = mean.astype(jnp.float32) - ref_mean.astype(jnp.float32)
  std = _over(jnp.asarray(std, jnp.float32), diff)
  return _mean_over_elements(jnp.square(diff) / (2.0 * jnp.square(std)))


def _check_mode(cfg_mode: str):
  if cfg_mode not in CFG_MODES:
    raise ValueError(f'unknown cfg_mode {cfg_mode!r}; valid: {CFG_MODES}')


def needs_unconditional(cfg_mode: str) -> bool:
  """Whether rollouts and replay run the unconditional branch."""
  _check_mode(cfg_mode)
  return cfg_mode == 'guided'


def velocity_for_mode(v_cond, v_uncond, guidance, cfg_mode: str, t=None):
  """The velocity rollouts sample with and the loss replays.

  Args:
    v_cond: the conditional velocity [B, ...].
    v_uncond: the unconditional one [B, ...]; None for 'none' (and unused by
      'cond_only').
    guidance: w, or a `sampling.Guidance` (w, an interval of t, BAGEL's
      renorm); used by 'guided' only.
    cfg_mode: one of CFG_MODES.
    t: [B] times, needed by a Guidance with an interval or renorm.

  Returns:
    'none', 'cond_only': v_cond. 'guided': v_u + w (v_c - v_u) (within the
    Guidance's interval, renormalized if it says so) with v_u
    stop-gradiented, so the value is the sampler's guided velocity and the
    gradient flows through the conditional branch only (d/dv_c = w without
    renorm).
  """
  _check_mode(cfg_mode)
  if cfg_mode == 'none' and v_uncond is not None:
    raise ValueError("cfg_mode 'none' has no unconditional velocity")
  if cfg_mode != 'guided':
    return v_cond
  if v_uncond is None:
    raise ValueError("cfg_mode 'guided' needs the unconditional velocity")
  v_uncond = jax.lax.stop_gradient(v_uncond)
  guidance = sampling.as_guidance(guidance)
  if t is None:
    if guidance != sampling.Guidance(guidance.scale):
      raise ValueError(f'{guidance} needs the times t')
    t = jnp.ones(v_cond.shape[:1])  # Inside (0, 1]: plain guidance.
  return sampling.guide(v_cond, v_uncond, t, guidance)


def _step_mask(sde_steps, num_steps: int):
  """[T] bool: True where the transition is an SDE step."""
  if sde_steps is None:
    return jnp.ones((num_steps,), bool)
  mask = jnp.asarray(sde_steps, bool)
  if mask.shape != (num_steps,):
    raise ValueError(f'sde_steps has shape {mask.shape}, need ({num_steps},)')
  return mask


def _transition(velocity_fn, x, t, t_next, is_sde, noise_level):
  """(mean, std) of an SDE or ODE step; rollout and replay share the math.

  t, t_next, is_sde: scalars (one step for the batch) or [B] (each sample
  its own step, as `replay_logprob` with `steps_tb`); std is shaped like t.
  """
  v = velocity_fn(x, jnp.broadcast_to(t, (x.shape[0],)))
  sigma_t, std = sde_std(t, t_next, noise_level)
  mean = jnp.where(_over(is_sde, x), sde_mean(x, v, t, t_next, sigma_t),
                   ode_step(x, v, t, t_next))
  return mean, std


def sde_rollout(velocity_fn: Callable, noise_bhwc, step_noise_tbhwc, times_t,
                noise_level, *, sde_steps=None):
  """Samples latents with the SDE from t = 1 to 0, recording each transition.

  Args:
    velocity_fn: (x [B, ...], t [B]) -> v [B, ...].
    noise_bhwc: the starting noise x_1 [B, ...].
    step_noise_tbhwc: z for each transition [T, B, ...].
    times_t: the schedule t_0 = 1 > ... > t_T = 0 [T + 1].
    noise_level: a.
    sde_steps: optional [T] bool (tuple or array); False steps are ODE steps
      (deterministic, logp 0), e.g. to train on a subset of transitions or
      to end with a deterministic step. Default: all SDE.

  Returns:
    {'latents': x_0 [B, ...], 'states': x_t before each transition
    [T, B, ...], 'next_states': after it [T, B, ...], 'logp': per-dimension
    log-probs [T, B] (0 on ODE steps), 'means': each transition's mean
    [T, B, ...] (the ODE step's result on ODE steps)}.
  """
  mask = _step_mask(sde_steps, step_noise_tbhwc.shape[0])

  def step(x, inputs):
    t, t_next, z, is_sde = inputs
    mean, std = _transition(velocity_fn, x, t, t_next, is_sde, noise_level)
    x_next = (mean + jnp.where(is_sde, std, 0.0) * z).astype(x.dtype)
    logp = jnp.where(is_sde, transition_logprob(x_next, mean, std), 0.0)
    return x_next, (x, x_next, logp, mean)

  xs = (times_t[:-1], times_t[1:], step_noise_tbhwc, mask)
  final, (states, next, logp, means) = jax.lax.scan(step, noise_bhwc, xs)
  return {'latents': final, 'states': states, 'next_states': next,
          'logp': logp, 'means': means}


def replay_logprob(velocity_fn: Callable, states_tb, next_states_tb, times_t,
                   noise_level, *, sde_steps=None, steps_tb=None):
  """Log-probs of recorded transitions under a (possibly updated) velocity.

  At the rollout's parameters this equals its 'logp' (the same arithmetic).

  Args:
    velocity_fn: (x [B, ...], t [B]) -> v [B, ...], called once per step.
    states_tb, next_states_tb: the rollout's 'states', 'next_states'
      [T, B, ...], or with `steps_tb` the K transitions it names [K, B, ...].
    times_t: the rollout's schedule [T + 1].
    noise_level: a, as in the rollout.
    sde_steps: the rollout's mask, if any; ODE steps get logp 0 and the ODE
      step as their mean.
    steps_tb: optional [K, B] int: which of the T transitions the states
      are, each sample its own (`transition_subsets`): only those K are
      replayed, K / T of the full replay's velocity evaluations.

  Returns:
    (logp, means, stds): logp [T, B] and means [T, B, ...] ([K, B] and
    [K, B, ...] with `steps_tb`); stds is the SDE's s of every step (ODE
    steps too, so `velocity_kl` stays finite: mask those steps), [T] or
    with `steps_tb` [K, B].
  """
  num_steps = times_t.shape[0] - 1
  mask = _step_mask(sde_steps, num_steps)
  if steps_tb is None:
    t, t_next = times_t[:-1], times_t[1:]
  else:
    if steps_tb.shape != states_tb.shape[:2]:
      raise ValueError(f'steps_tb has shape {steps_tb.shape}, the states '
                       f'{states_tb.shape[:2]}')
    t, t_next, mask = times_t[steps_tb], times_t[steps_tb + 1], mask[steps_tb]

  def step(_, inputs):
    x, x_next, t, t_next, is_sde = inputs
    mean, std = _transition(velocity_fn, x, t, t_next, is_sde, noise_level)
    logp = jnp.where(is_sde, transition_logprob(x_next, mean, std), 0.0)
    return None, (logp, mean, std)

  xs = (states_tb, next_states_tb, t, t_next, mask)
  _, (logp, means, stds) = jax.lax.scan(step, None, xs)
  return logp, means, stds


def transition_subsets(keys_n, num_steps: int, count: int):
  """[N, count] int32: for each sample, `count` distinct transitions of
  `num_steps`, drawn from its key (ascending).

  Flow-GRPO's `timestep_fraction`: the update replays only these, an
  unbiased sample of a rollout's transitions at count / num_steps of the
  cost (the reference pass too).
  """
  if not 1 <= count <= num_steps:
    raise ValueError(f'count must be in [1, {num_steps}], got {count}')
  pick = lambda key: jax.random.permutation(key, num_steps)[:count]
  return jnp.sort(jax.vmap(pick)(keys_n), axis=-1).astype(jnp.int32)
