"""GRPO math against hand-computed numbers and a loop-by-loop numpy reference:
advantages, ratios, both clip bounds and their gradients, every KL estimator,
every loss aggregation (and its micro-batch accumulation), the full loss."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvrpo_jax.rl import grpo

LOG = math.log


# An independent reference: plain Python loops over elements, written from
# the formulas, sharing no code with the module.


def _ref_advantages(rewards, group_size, scale, eps):
  out = []
  everything = [float(r) for r in rewards]
  batch_mean = sum(everything) / len(everything)
  batch_std = math.sqrt(sum((r - batch_mean) ** 2 for r in everything)
                        / len(everything))
  for start in range(0, len(rewards), group_size):
    group = [float(r) for r in rewards[start:start + group_size]]
    mean = sum(group) / group_size
    std = math.sqrt(sum((r - mean) ** 2 for r in group) / group_size)
    for r in group:
      if max(group) == min(group):
        out.append(0.0)
      elif scale == 'std':
        out.append((r - mean) / (std + eps))
      elif scale == 'batch_std':
        out.append((r - mean) / (batch_std + eps))
      elif scale == 'mean':
        out.append((r - mean) / (mean + eps))
      else:
        out.append(r - mean)
  return np.array(out)


def _ref_log_ratio(logp, old, mask, level):
  n, t = logp.shape
  out = np.zeros((n, t))
  for i in range(n):
    valid = [j for j in range(t) if mask[i][j]]
    seq = sum(logp[i][j] - old[i][j] for j in valid) / max(len(valid), 1)
    for j in valid:
      out[i][j] = seq if level == 'sequence' else logp[i][j] - old[i][j]
  return out


def _ref_surrogate(logp, old, adv, mask, lo, hi, level='token'):
  lr = _ref_log_ratio(logp, old, mask, level)
  n, t = logp.shape
  out = np.zeros((n, t))
  for i in range(n):
    for j in range(t):
      if mask[i][j]:
        rho = math.exp(lr[i][j])
        clipped = min(max(rho, 1 - lo), 1 + hi)
        out[i][j] = -min(rho * adv[i], clipped * adv[i])
  return out


def _ref_kl(logp, ref, estimator):
  out = np.zeros(logp.shape)
  for idx in np.ndindex(logp.shape):
    d = float(ref[idx]) - float(logp[idx])
    out[idx] = {'k1': -d, 'k2': 0.5 * d * d,
                'k3': math.exp(d) - d - 1}[estimator]
  return out


def _ref_aggregate(loss, mask, loss_agg, max_len=None):
  n, t = loss.shape
  rows = [[float(loss[i][j]) for j in range(t) if mask[i][j]]
          for i in range(n)]
  tokens = [x for row in rows for x in row]
  if loss_agg == 'grpo':
    return sum(sum(r) / len(r) if r else 0.0 for r in rows), n
  if loss_agg == 'dapo':
    return sum(tokens), len(tokens)
  if loss_agg == 'bnpo':
    return (sum(tokens) / len(tokens) if tokens else 0.0), 1
  return sum(tokens), n * (t if max_len is None else max_len)


def _random_batch(seed, n=6, t=5):
  rng = np.random.default_rng(seed)
  old = rng.normal(-1.5, 0.5, (n, t)).astype(np.float32)
  logp = (old + rng.normal(0, 0.3, (n, t))).astype(np.float32)
  ref = (old + rng.normal(0, 0.3, (n, t))).astype(np.float32)
  lengths = rng.integers(0, t + 1, n)
  lengths[0] = t  # At least one full row besides the random ones.
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  adv = rng.normal(0, 1, n).astype(np.float32)
  return logp, old, ref, adv, mask


# --- advantages --------------------------------------------------------------


def test_advantages_by_hand():
  rewards = jnp.array([1., 0., 0., 1., 2., 2., 2., 2.])
  # Group 1: mean 0.5, population std 0.5 -> +-0.5 / (0.5 + 1e-6).
  np.testing.assert_allclose(
      grpo.group_advantages(rewards, 4),
      [0.999998, -0.999998, -0.999998, 0.999998, 0., 0., 0., 0.], rtol=1e-6)
  np.testing.assert_array_equal(
      grpo.group_advantages(rewards, 4, eps=0.0),
      [1., -1., -1., 1., 0., 0., 0., 0.])
  np.testing.assert_array_equal(
      grpo.group_advantages(rewards, 4, scale_by_std=False),
      [0.5, -0.5, -0.5, 0.5, 0., 0., 0., 0.])
  # [0, 1, 2]: population std sqrt(2/3), so A = +-sqrt(3/2); TRL's sample
  # std (ddof=1) would be 1 and give +-1.
  np.testing.assert_allclose(
      grpo.group_advantages(jnp.array([0., 1., 2.]), 3, eps=0.0),
      [-1.2247449, 0., 1.2247449], rtol=1e-6)


def test_batch_std_advantages_by_hand():
  # Group 1 [0, 0.2]: mean 0.1; group 2 [1, 1]. The batch [0, 0.2, 1, 1]
  # has mean 0.55 and population std sqrt((0.3025 + 0.1225 + 2 * 0.2025)
  # / 4) = sqrt(0.2075). The group's own std (0.1) would give +-1.
  rewards = jnp.array([0., 0.2, 1., 1.])
  np.testing.assert_allclose(
      grpo.group_advantages(rewards, 2, std_level='batch', eps=0.0),
      [-0.1 / math.sqrt(0.2075), 0.1 / math.sqrt(0.2075), 0., 0.],
      rtol=1e-5)
  np.testing.assert_allclose(
      grpo.group_advantages(rewards, 2, eps=0.0), [-1., 1., 0., 0.],
      rtol=1e-5)
  with pytest.raises(ValueError, match='std_level'):
    grpo.group_advantages(rewards, 2, std_level='prompt')


def test_all_equal_groups_are_exactly_zero():
  # 0.1 is not a float: the mean of equal values may round off them.
  rewards = jnp.array([0.1, 0.1, 0.1, 7., 7., 7., 0., 1., 0.])
  for scale in (True, False):
    adv = np.asarray(grpo.group_advantages(rewards, 3, eps=0.0,
                                           scale_by_std=scale))
    assert np.isfinite(adv).all()
    np.testing.assert_array_equal(adv[:6], 0.0)
  stats = grpo.group_stats(rewards, 3)
  assert int(stats['degenerate_groups']) == 2
  # Stds 0, 0 and sqrt(2/9) = 0.4714045.
  np.testing.assert_allclose(stats['group_std_mean'], 0.4714045 / 3,
                             rtol=1e-5)


def test_group_stats_by_hand():
  stats = grpo.group_stats(jnp.array([1., 0., 0., 1., 2., 2., 2., 2.]), 4)
  assert int(stats['degenerate_groups']) == 1
  np.testing.assert_allclose(stats['group_std_mean'], 0.25)


@pytest.mark.parametrize('scale', ['std', 'batch_std', 'none', 'mean'])
def test_advantages_match_reference(scale):
  rng = np.random.default_rng(0)
  # Small integer rewards: some groups are degenerate. Dividing by the mean
  # is for rewards >= 0.
  rewards = np.concatenate([rng.integers(0, 2, 16), rng.normal(size=8)])
  if scale == 'mean':
    rewards = np.abs(rewards)
  np.testing.assert_allclose(
      grpo.group_advantages(jnp.asarray(rewards, jnp.float32), 4,
                            scale_by_std=scale.endswith('std'),
                            scale_by_mean=scale == 'mean',
                            std_level='batch' if scale == 'batch_std'
                            else 'group'),
      _ref_advantages(rewards.astype(np.float32), 4, scale, 1e-6),
      rtol=1e-5, atol=1e-6)


def test_mean_scaled_advantages_by_hand():
  # One right of four: mean 1/4, so A = (1 - 1/4) * 4 = 3 and -1; three
  # right: mean 3/4, A = 1/3 and -1. The std would give +-sqrt(3) to both
  # groups' rare answer (std sqrt(3) / 4).
  rewards = jnp.array([1., 0., 0., 0., 1., 1., 0., 1., 0., 0., 0., 0.])
  np.testing.assert_allclose(
      grpo.group_advantages(rewards, 4, scale_by_std=False,
                            scale_by_mean=True, eps=0.0),
      [3., -1., -1., -1., 1 / 3, 1 / 3, -1., 1 / 3, 0., 0., 0., 0.],
      rtol=1e-6)
  with pytest.raises(ValueError, match='exclude each other'):
    grpo.group_advantages(rewards, 4, scale_by_mean=True)


def test_mean_scaled_step_is_the_supervised_gradient_on_right_answers():
  # For a 0/1 reward, sum_i A_i s_i = G (mean of s over the right answers
  # - mean of s over all), s_i any per-sample vector (grad log pi(o_i)).
  rng = np.random.default_rng(3)
  rewards = np.array([0., 1., 0., 1., 1., 0., 0., 0.])
  scores = rng.normal(size=(8, 5))
  adv = np.asarray(grpo.group_advantages(
      jnp.asarray(rewards), 8, scale_by_std=False, scale_by_mean=True,
      eps=0.0))
  right = rewards == 1
  np.testing.assert_allclose(
      adv @ scores, 8 * (scores[right].mean(0) - scores.mean(0)), rtol=1e-5)


@pytest.mark.parametrize('group_size', [4, 0, -2])
def test_bad_group_size_raises(group_size):
  with pytest.raises(ValueError, match='group_size'):
    grpo.group_advantages(jnp.zeros(6), group_size)
  with pytest.raises(ValueError, match='group_size'):
    grpo.group_stats(jnp.zeros(6), group_size)


# --- ratios and the clipped surrogate ----------------------------------------


def test_log_ratio_by_hand():
  logp = jnp.array([[LOG(.5), LOG(.25), -jnp.inf], [-1., -2., -3.]])
  old = jnp.array([[LOG(.25), LOG(.25), -jnp.inf], [-1.5, -2.5, -3.5]])
  mask = jnp.array([[1., 1., 0.], [0., 0., 0.]])
  token = grpo.log_ratio(logp, old, mask, 'token')
  np.testing.assert_allclose(token, [[LOG(2.), 0., 0.], [0., 0., 0.]],
                             atol=1e-7)
  seq = grpo.log_ratio(logp, old, mask, 'sequence')
  # (log 2 + 0) / 2 on both valid tokens: rho = sqrt(2); padding and the
  # empty row give 0 (not NaN from -inf - -inf or 0 / 0).
  np.testing.assert_allclose(jnp.exp(seq[0, :2]), [1.4142135, 1.4142135],
                             rtol=1e-6)
  np.testing.assert_array_equal(seq[0, 2], 0.0)
  np.testing.assert_array_equal(seq[1], 0.0)
  with pytest.raises(ValueError, match='token'):
    grpo.log_ratio(logp, old, mask, 'tokens')


def test_sequence_ratio_is_one_per_sequence():
  logp, old, _, _, mask = _random_batch(1)
  seq = np.asarray(grpo.log_ratio(jnp.asarray(logp), jnp.asarray(old),
                                  jnp.asarray(mask), 'sequence'))
  np.testing.assert_allclose(seq, _ref_log_ratio(logp, old, mask,
                                                 'sequence'), atol=1e-6)
  for i in range(mask.shape[0]):
    valid = seq[i][mask[i] > 0]
    if valid.size:
      np.testing.assert_array_equal(valid, valid[0])


# Row 0 has A = +2, row 1 A = -1; epsilon_low = 0.2, epsilon_high = 0.28.
_RHO = np.array([[1.5, 1.1, 0.5], [0.5, 1.5, 3.0]])
_OLD = np.array([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]], np.float32)
_ADV = jnp.array([2., -1.])
_MASK = jnp.array([[1., 1., 1.], [1., 1., 0.]])


def _clip_example(logp):
  return grpo.clipped_surrogate(logp, jnp.asarray(_OLD), _ADV, _MASK,
                                clip_eps_low=0.2, clip_eps_high=0.28)


def test_clipped_surrogate_by_hand():
  logp = jnp.asarray(_OLD + np.log(_RHO), jnp.float32)
  loss, aux = _clip_example(logp)
  # Row 0 (A = 2): rho 1.5 clips to 1.28 -> -2.56; rho 1.1 -> -2.2; rho 0.5
  # does not clip for A > 0 -> -1. Row 1 (A = -1): rho 0.5 clips to 0.8 ->
  # 0.8; rho 1.5 does not clip for A < 0 -> 1.5; padding -> 0.
  np.testing.assert_allclose(loss, [[-2.56, -2.2, -1.0], [0.8, 1.5, 0.0]],
                             rtol=1e-5)
  np.testing.assert_allclose(aux['clip_low_frac'], 0.2)
  np.testing.assert_allclose(aux['clip_high_frac'], 0.2)
  np.testing.assert_allclose(aux['ratio_mean'], 1.02, rtol=1e-5)
  np.testing.assert_allclose(aux['ratio_min'], 0.5, rtol=1e-5)
  np.testing.assert_allclose(aux['ratio_max'], 1.5, rtol=1e-5)
  # The clipped tokens (and padding) have no gradient; the others -A rho.
  grad = jax.grad(lambda lp: _clip_example(lp)[0].sum())(logp)
  np.testing.assert_allclose(grad, [[0., -2.2, -1.0], [0., 1.5, 0.]],
                             rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('level', ['token', 'sequence'])
def test_clipped_surrogate_matches_reference(level):
  logp, old, _, adv, mask = _random_batch(2)
  loss, _ = grpo.clipped_surrogate(
      jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv),
      jnp.asarray(mask), clip_eps_low=0.2, clip_eps_high=0.2,
      importance_level=level)
  np.testing.assert_allclose(
      loss, _ref_surrogate(logp, old, adv, mask, 0.2, 0.2, level),
      rtol=1e-5, atol=1e-6)


# --- KL ----------------------------------------------------------------------


def test_kl_estimators_by_hand():
  logp = jnp.array([LOG(.5), LOG(.25)])
  ref = jnp.array([LOG(.25), LOG(.5)])
  # d = ref - logp = [-log 2, log 2].
  expected = {
      'k1': [0.6931472, -0.6931472],
      'k2': [0.2402265, 0.2402265],       # (log 2)^2 / 2.
      'k3': [0.1931472, 0.3068528],       # 1/2 + log 2 - 1, 2 - log 2 - 1.
  }
  for name, want in expected.items():
    np.testing.assert_allclose(grpo.kl_penalty(logp, ref, name), want,
                               rtol=1e-6)
    np.testing.assert_array_equal(grpo.kl_penalty(logp, logp, name), 0.0)
  with pytest.raises(ValueError, match="'k1', 'k2', 'k3'"):
    grpo.kl_penalty(logp, ref, 'k4')


@pytest.mark.parametrize('estimator', ['k1', 'k2', 'k3'])
def test_kl_matches_reference(estimator):
  logp, _, ref, _, _ = _random_batch(3)
  np.testing.assert_allclose(grpo.kl_penalty(logp, ref, estimator),
                             _ref_kl(logp, ref, estimator),
                             rtol=1e-5, atol=1e-6)


def test_k3_is_never_negative():
  rng = np.random.default_rng(4)
  logp = jnp.asarray(rng.normal(0, 5, 4096), jnp.float32)
  ref = jnp.asarray(rng.normal(0, 5, 4096), jnp.float32)
  near = logp + jnp.asarray(rng.normal(0, 1e-4, 4096), jnp.float32)
  for r in (ref, near):
    assert (np.asarray(grpo.kl_penalty(logp, r, 'k3')) >= 0).all()


# --- aggregation -------------------------------------------------------------

# Padding holds 100s: they must not count.
_LOSS = jnp.array([[1., 2., 3., 4.], [5., 6., 100., 100.],
                   [7., 100., 100., 100.], [9., 9., 9., 9.]])
_AGG_MASK = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0],
                       [0, 0, 0, 0]])


@pytest.mark.parametrize('loss_agg, max_len, want', [
    ('grpo', None, (15., 4.)),     # Means 2.5 + 5.5 + 7 + 0 (empty row).
    ('dapo', None, (28., 7.)),     # 1 + ... + 7 over 7 tokens.
    ('bnpo', None, (4., 1.)),      # 28 / 7.
    ('dr_grpo', None, (28., 16.)),  # 4 sequences x T = 4.
    ('dr_grpo', 8, (28., 32.)),    # 4 sequences x max_len = 8.
])
def test_aggregate_by_hand(loss_agg, max_len, want):
  got = grpo.aggregate(_LOSS, _AGG_MASK, loss_agg, max_len)
  np.testing.assert_allclose(got, want)
  np.testing.assert_allclose(
      got, _ref_aggregate(np.asarray(_LOSS), np.asarray(_AGG_MASK), loss_agg,
                          max_len))


def test_aggregate_no_valid_tokens_is_zero():
  for loss_agg in grpo.LOSS_AGGREGATIONS:
    total, _ = grpo.aggregate(_LOSS, jnp.zeros((4, 4)), loss_agg)
    assert float(total) == 0.0
  assert float(grpo.aggregate(_LOSS, jnp.zeros((4, 4)), 'bnpo')[1]) == 1.0
  with pytest.raises(ValueError, match='dapo'):
    grpo.aggregate(_LOSS, _AGG_MASK, 'token_mean')


@pytest.mark.parametrize('loss_agg', ['grpo', 'dapo', 'bnpo', 'dr_grpo'])
def test_aggregate_matches_reference(loss_agg):
  loss, _, _, _, mask = _random_batch(5, n=7, t=6)
  np.testing.assert_allclose(
      grpo.aggregate(jnp.asarray(loss), jnp.asarray(mask), loss_agg, 9),
      _ref_aggregate(loss, mask, loss_agg, 9), rtol=1e-5)


def test_micro_batch_accumulation():
  # Half 1 has 7 valid tokens of loss 1, half 2 has 3 of loss 4.
  loss = jnp.array([[1.] * 4, [1.] * 4, [4.] * 4, [4.] * 4])
  mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])

  def accumulated(loss_agg):
    halves = [grpo.aggregate(loss[s], mask[s], loss_agg)
              for s in (slice(0, 2), slice(2, 4))]
    return sum(h[0] for h in halves) / sum(h[1] for h in halves)

  def full(loss_agg):
    total, denom = grpo.aggregate(loss, mask, loss_agg)
    return total / denom

  # dapo: the global token mean (7 + 12) / 10, whatever the split.
  np.testing.assert_allclose(full('dapo'), 1.9)
  np.testing.assert_allclose(accumulated('dapo'), 1.9)
  # bnpo: the mean of the halves' token means (1 + 4) / 2, not 1.9.
  np.testing.assert_allclose(full('bnpo'), 1.9)
  np.testing.assert_allclose(accumulated('bnpo'), 2.5)
  # grpo and dr_grpo are exact too: (1 + 1 + 4 + 4) / 4, 19 / 16.
  for loss_agg, want in (('grpo', 2.5), ('dr_grpo', 19 / 16)):
    np.testing.assert_allclose(full(loss_agg), want)
    np.testing.assert_allclose(accumulated(loss_agg), want)


# --- the full loss -----------------------------------------------------------


@pytest.mark.parametrize('loss_agg, level', [('grpo', 'token'),
                                             ('dapo', 'sequence')])
def test_policy_loss_jit_matches_reference(loss_agg, level):
  logp, old, ref, adv, mask = _random_batch(6)
  loss_fn = jax.jit(functools.partial(
      grpo.policy_loss, clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.04,
      kl_estimator='k3', loss_agg=loss_agg, importance_level=level))
  (total, denom), aux = loss_fn(*map(jnp.asarray,
                                     (logp, old, ref, adv, mask)))
  per_token = (_ref_surrogate(logp, old, adv, mask, 0.2, 0.28, level)
               + 0.04 * _ref_kl(logp, ref, 'k3'))
  want = _ref_aggregate(per_token, mask, loss_agg)
  np.testing.assert_allclose((total, denom), want, rtol=1e-5)
  kl = _ref_kl(logp, ref, 'k3')
  np.testing.assert_allclose(aux['kl_mean'], kl[mask > 0].mean(), rtol=1e-5)
  assert set(aux) == {'clip_low_frac', 'clip_high_frac', 'ratio_mean',
                      'ratio_min', 'ratio_max', 'kl_mean'}


def test_policy_loss_without_kl():
  logp, old, ref, adv, mask = map(jnp.asarray, _random_batch(7))
  kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_estimator='k3',
                loss_agg='dapo')
  loss, aux = grpo.policy_loss(logp, old, None, adv, mask, kl_coef=0.0,
                               **kwargs)
  surrogate, _ = grpo.clipped_surrogate(logp, old, adv, mask,
                                        clip_eps_low=0.2, clip_eps_high=0.2)
  np.testing.assert_allclose(loss, grpo.aggregate(surrogate, mask, 'dapo'))
  assert float(aux['kl_mean']) == 0.0
  # With a reference and beta = 0 the KL is logged but costs nothing.
  loss_ref, aux_ref = grpo.policy_loss(logp, old, ref, adv, mask,
                                       kl_coef=0.0, **kwargs)
  np.testing.assert_allclose(loss_ref, loss)
  assert float(aux_ref['kl_mean']) > 0.0
  with pytest.raises(ValueError, match='ref_logp'):
    grpo.policy_loss(logp, old, None, adv, mask, kl_coef=0.1, **kwargs)


def test_on_policy_gradient_is_the_policy_gradient():
  # mu = 1: pi_theta == pi_old, rho = 1, nothing clips, and with dapo the
  # gradient wrt each valid token's logp is -A_i / (valid tokens).
  _, old, _, adv, mask = map(jnp.asarray, _random_batch(8))

  def loss(logp):
    (total, denom), _ = grpo.policy_loss(
        logp, old, None, adv, mask, clip_eps_low=0.2, clip_eps_high=0.2,
        kl_coef=0.0, kl_estimator='k3', loss_agg='dapo')
    return total / denom

  grad = jax.grad(loss)(old)
  np.testing.assert_allclose(grad, -adv[:, None] * mask / mask.sum(),
                             rtol=1e-5, atol=1e-7)
