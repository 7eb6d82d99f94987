"""GRPO's objective as small registered pure functions.

For each prompt q, G outputs o_1..o_G are sampled from pi_old and scored r_i;
A_i = (r_i - mean(r)) / (std(r) + eps) (Dr. GRPO drops the std; dividing by
mean(r) instead makes the step the gradient of log E[r], see
`group_advantages`). With
rho_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t}),
GRPO maximizes

  J = E[ agg_{i,t} min(rho_{i,t} A_i, clip(rho_{i,t}, 1 - epsilon_low,
                                          1 + epsilon_high) A_i)
         - beta KL(pi_theta || pi_ref) ]

where agg is the averaging chosen by `loss_agg` (TRL's names) and
epsilon_low = epsilon_high = epsilon in the paper (DAPO decouples them).
pi_old sampled the batch and is replaced by pi_theta after mu inner updates,
so for mu = 1 rho = 1 in value (its gradient is still the policy gradient).
GSPO uses the sequence ratio exp(mean_t log rho_{i,t}) instead of rho_{i,t}.

Losses here are -J, to *minimize*, as (sum, denominator) pairs: the train
step divides once over all micro-batches, so accumulation is exact.

Shape legend: N sequences (= B prompts x G samples, a prompt's G samples on
consecutive rows), T completion tokens. `mask_nt` is 1 (or True) on the
completion tokens that count and 0 on padding.
"""

from typing import Callable

import jax
import jax.numpy as jnp


def _masked_sum(x, valid, axis=None):
  # jnp.where, not x * mask: padding may hold inf/NaN log-probs.
  return jnp.sum(jnp.where(valid, x, 0.0), axis=axis)


def _masked_mean(x, valid, axis=None):
  count = jnp.sum(valid, axis=axis, dtype=jnp.float32)
  return _masked_sum(x, valid, axis) / jnp.maximum(count, 1.0)


def _groups(rewards_n, group_size: int):
  """[N] -> [N/G, G], raising on a bad G (shapes are static)."""
  n = rewards_n.shape[0]
  if group_size < 1 or n % group_size:
    raise ValueError(f'group_size={group_size} does not divide the {n} '
                     'rewards into whole groups')
  return jnp.asarray(rewards_n, jnp.float32).reshape(-1, group_size)


def _degenerate(r_gk):
  """[N/G] whether a group's rewards are all equal (it carries no signal)."""
  return r_gk.max(axis=1) == r_gk.min(axis=1)


STD_LEVELS: tuple[str, ...] = ('group', 'batch')


def group_advantages(rewards_n: jax.Array, group_size: int, *,
                     scale_by_std: bool = True, scale_by_mean: bool = False,
                     std_level: str = 'group',
                     eps: float = 1e-6) -> jax.Array:
  """A_i = (r_i - mean_G r) / (std_G r + eps), or r_i - mean_G r (Dr. GRPO),
  or (r_i - mean_G r) / (mean_G r + eps).

  With std_level='batch' the std is the whole batch's, std_N r, not the
  group's (TRL's scale_rewards='batch'; "group mean, batch std" in Liu et
  al. 2025, "Tricks or Traps?"): a group whose rewards barely differ gets
  small advantages instead of ones scaled up to unit spread.

  The std is the population std (ddof=0), as tunix; TRL uses the sample std
  (ddof=1), which gives smaller advantages for small G.

  Dividing by the mean (for rewards >= 0) makes sum_i A_i grad log pi(o_i)
  an estimate of grad log E[r] rather than grad E[r]. For a 0/1 reward
  that is the gradient of the log-probability of being right: the
  supervised gradient on the group's right answers, G (mean over right
  answers - mean over all) of grad log pi. The std's
  1 / sqrt(q (1 - q)) (q the fraction right) weighs a group that is almost
  always right as much as one that is almost always wrong; 1 / q weighs
  only the latter up. A question the policy mostly answers wrong then
  outweighs the many it answers right, instead of the majority answer
  taking over wherever the policy cannot tell the inputs apart.

  Args:
    rewards_n: [N] rewards, N/G consecutive groups of G (one prompt each).
    group_size: G.
    scale_by_std: divide by the group's std (GRPO) or not (Dr. GRPO).
    scale_by_mean: divide by the group's mean instead; rewards must be
      >= 0 (not checked here: `rewards.combine` checks its inputs).
    std_level: the std scale_by_std divides by: the 'group''s or the
      'batch''s (all N rewards).
    eps: added to the std or mean.

  Returns:
    adv_n: [N] float32; exactly 0 for a group whose rewards are all equal.
  """
  if scale_by_std and scale_by_mean:
    raise ValueError('scale_by_std and scale_by_mean exclude each other')
  if std_level not in STD_LEVELS:
    raise ValueError(f'unknown std_level {std_level!r}; valid: {STD_LEVELS}')
  r_gk = _groups(rewards_n, group_size)
  centered_gk = r_gk - r_gk.mean(axis=1, keepdims=True)
  if scale_by_std:
    centered_gk = centered_gk / (eps + (r_gk.std(axis=1, keepdims=True)
                                        if std_level == 'group'
                                        else r_gk.std()))
  elif scale_by_mean:
    centered_gk = centered_gk / (r_gk.mean(axis=1, keepdims=True) + eps)
  # Comparing max and min, not std to 0: the mean of equal floats can round
  # away from them, leaving a tiny nonzero std and advantage.
  return jnp.where(_degenerate(r_gk)[:, None], 0.0, centered_gk).reshape(-1)


def group_stats(rewards_n: jax.Array, group_size: int) -> dict:
  """Logging: 'degenerate_groups' (groups with all rewards equal, int32) and
  'group_std_mean' (the mean over groups of the population std)."""
  r_gk = _groups(rewards_n, group_size)
  return {'degenerate_groups': _degenerate(r_gk).sum(dtype=jnp.int32),
          'group_std_mean': r_gk.std(axis=1).mean()}


# (log rho per token, valid_nt) -> log ratio. GSPO's 'sequence' gives a
# sequence one ratio, the geometric mean of its token ratios (TRL's
# importance_sampling_level='sequence').
IMPORTANCE_LEVELS: dict[str, Callable] = {
    'token': lambda lr, v: jnp.where(v, lr, 0.0),
    'sequence': lambda lr, v: jnp.where(
        v, _masked_mean(lr, v, axis=1)[:, None], 0.0),
}


def _lookup(registry: dict, name: str, what: str) -> Callable:
  if name not in registry:
    raise ValueError(f'unknown {what} {name!r}; valid: {sorted(registry)}')
  return registry[name]


def log_ratio(logp_nt: jax.Array, old_logp_nt: jax.Array, mask_nt: jax.Array,
              importance_level: str) -> jax.Array:
  """log rho [N, T]: per token ('token') or the masked mean of the token
  log-ratios of each sequence, broadcast over its tokens ('sequence', GSPO).
  Masked positions give 0; a row with no valid token is all 0."""
  fn = _lookup(IMPORTANCE_LEVELS, importance_level, 'importance_level')
  return fn(logp_nt - old_logp_nt, mask_nt.astype(bool))


def clipped_surrogate(logp_nt: jax.Array, old_logp_nt: jax.Array,
                      adv_n: jax.Array, mask_nt: jax.Array, *,
                      clip_eps_low: float, clip_eps_high: float,
                      importance_level: str = 'token'):
  """-min(rho A, clip(rho, 1 - epsilon_low, 1 + epsilon_high) A) per token.

  The negated PPO/GRPO surrogate, to minimize. A clipped token's loss is
  constant in logp, so it has no gradient; an unclipped one has gradient
  -A rho wrt its logp (token level).

  Args:
    logp_nt: [N, T] log pi_theta of the sampled tokens.
    old_logp_nt: [N, T] log pi_old of the same tokens.
    adv_n: [N] advantages A_i.
    mask_nt: [N, T] 1 on valid completion tokens.
    clip_eps_low, clip_eps_high: epsilon_low, epsilon_high.
    importance_level: 'token' (GRPO) or 'sequence' (GSPO).

  Returns:
    (loss_nt [N, T], 0 at masked positions; aux): aux holds scalar masked
    means over valid tokens (0 if there are none): 'clip_low_frac' (A < 0
    and rho < 1 - epsilon_low), 'clip_high_frac' (A > 0 and
    rho > 1 + epsilon_high), 'ratio_mean', 'ratio_min', 'ratio_max'.
  """
  valid_nt = mask_nt.astype(bool)
  rho_nt = jnp.exp(log_ratio(logp_nt, old_logp_nt, mask_nt, importance_level))
  adv_n1 = adv_n[:, None]
  clipped_nt = jnp.clip(rho_nt, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
  loss_nt = -jnp.minimum(rho_nt * adv_n1, clipped_nt * adv_n1)
  mean = lambda x: _masked_mean(x.astype(jnp.float32), valid_nt)
  extreme = lambda reduce, fill: jnp.where(
      valid_nt.any(), reduce(jnp.where(valid_nt, rho_nt, fill)), 0.0)
  aux = {
      'clip_low_frac': mean((adv_n1 < 0) & (rho_nt < 1.0 - clip_eps_low)),
      'clip_high_frac': mean((adv_n1 > 0) & (rho_nt > 1.0 + clip_eps_high)),
      'ratio_mean': mean(rho_nt),
      'ratio_min': extreme(jnp.min, jnp.inf),
      'ratio_max': extreme(jnp.max, -jnp.inf),
  }
  return jnp.where(valid_nt, loss_nt, 0.0), aux


# Estimators of KL(pi_theta || pi_ref) from tokens sampled from pi_theta,
# as functions of d = log pi_ref - log pi_theta (Schulman, "Approximating KL
# divergence"): k1 is unbiased but can be negative, k2 is biased with low
# variance, k3 is unbiased and never negative (GRPO's choice).
KL_ESTIMATORS: dict[str, Callable] = {
    'k1': lambda d: -d,
    'k2': lambda d: 0.5 * jnp.square(d),
    # expm1(d) - d is exp(d) - d - 1 without the cancellation near d = 0.
    'k3': lambda d: jnp.expm1(d) - d,
}


def kl_penalty(logp_nt, ref_logp_nt, estimator: str) -> jax.Array:
  """Per-token KL(pi_theta || pi_ref) estimate [N, T] ('k1', 'k2', 'k3')."""
  fn = _lookup(KL_ESTIMATORS, estimator, 'kl_estimator')
  return fn(ref_logp_nt - logp_nt)


# Each maps (loss_nt, valid_nt, max_len) to (sum, denominator); see
# `aggregate` for their meanings.
LOSS_AGGREGATIONS: dict[str, Callable] = {
    'grpo': lambda x, v, _: (_masked_mean(x, v, axis=1).sum(),
                             jnp.float32(x.shape[0])),
    'dapo': lambda x, v, _: (_masked_sum(x, v),
                             jnp.sum(v, dtype=jnp.float32)),
    'bnpo': lambda x, v, _: (_masked_mean(x, v), jnp.float32(1.0)),
    'dr_grpo': lambda x, v, max_len: (_masked_sum(x, v),
                                      jnp.float32(x.shape[0] * max_len)),
}


def aggregate(loss_nt: jax.Array, mask_nt: jax.Array, loss_agg: str,
              max_len: int | None = None):
  """Reduces per-token losses to a (sum, denominator) pair, TRL's meanings.

  The step divides the sum of sums by the sum of denominators over
  micro-batches, so:
    'grpo': each sequence's mean over its valid tokens, then the mean over
      sequences -> (sum of sequence means, N). A sequence without valid
      tokens contributes 0 and still counts in N, as in TRL.
    'dapo': the mean over every valid token of the global batch -> (masked
      sum, valid tokens); exact across micro-batches.
    'bnpo': the mean over the valid tokens of this (micro-)batch, as TRL
      normalizes by the local batch -> (local mean, 1); accumulation then
      averages micro-batch means. No valid token gives 0.
    'dr_grpo': Dr. GRPO's constant normalizer -> (masked sum, N * max_len),
      max_len defaulting to T.

  Args:
    loss_nt: [N, T] per-token losses.
    mask_nt: [N, T] 1 on valid tokens.
    loss_agg: one of LOSS_AGGREGATIONS.
    max_len: the maximum completion length, for 'dr_grpo'.

  Returns:
    (sum, denominator), float32 scalars.
  """
  fn = _lookup(LOSS_AGGREGATIONS, loss_agg, 'loss_agg')
  max_len = loss_nt.shape[1] if max_len is None else max_len
  return fn(loss_nt, mask_nt.astype(bool), max_len)


def policy_loss(logp, old_logp, ref_logp, advantages, mask, *,
                clip_eps_low: float, clip_eps_high: float, kl_coef: float,
                kl_estimator: str, loss_agg: str,
                importance_level: str = 'token', max_len: int | None = None):
  """GRPO's loss: aggregate(surrogate + beta KL) as a (sum, denominator).

  Args:
    logp, old_logp, advantages, mask, clip_eps_low, clip_eps_high,
      importance_level: as `clipped_surrogate` ([N, T], [N, T], [N], [N, T]).
    ref_logp: [N, T] log pi_ref, or None when kl_coef == 0 (KL logged as 0).
    kl_coef: beta, a Python float; the KL is computed and logged even at 0.
    kl_estimator: 'k1', 'k2' or 'k3' (see `KL_ESTIMATORS`).
    loss_agg, max_len: as `aggregate`.

  Returns:
    ((sum, denominator), aux): aux is `clipped_surrogate`'s plus 'kl_mean',
    the masked mean of the per-token KL.
  """
  if ref_logp is None and kl_coef != 0:
    raise ValueError(f'kl_coef={kl_coef} needs ref_logp')
  loss_nt, aux = clipped_surrogate(
      logp, old_logp, advantages, mask, clip_eps_low=clip_eps_low,
      clip_eps_high=clip_eps_high, importance_level=importance_level)
  if ref_logp is None:
    aux['kl_mean'] = jnp.float32(0.0)
  else:
    kl_nt = kl_penalty(logp, ref_logp, kl_estimator)
    aux['kl_mean'] = _masked_mean(kl_nt, mask.astype(bool))
    loss_nt = loss_nt + kl_coef * kl_nt
  return aggregate(loss_nt, mask, loss_agg, max_len), aux
