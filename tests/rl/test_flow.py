"""Flow-GRPO transitions (rl/flow.py) against hand-computed numbers, scipy's
Gaussian density, the general Gaussian KL and an independent numpy rollout."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lvrpo_jax.models import sampling
from lvrpo_jax.rl import flow


def test_transition_logprob_is_the_gaussian_density_per_dimension():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
  mean = rng.normal(size=x.shape).astype(np.float32)
  std = np.array([0.3, 1.0, 2.5], np.float32)
  got = flow.transition_logprob(jnp.asarray(x), jnp.asarray(mean),
                                jnp.asarray(std))
  density = stats.norm.logpdf(x, mean, std[:, None, None, None])
  d = 4 * 4 * 2
  # The exact log-density is the per-dimension one times D.
  np.testing.assert_allclose(got * d, density.reshape(3, -1).sum(1),
                             rtol=1e-5)
  np.testing.assert_allclose(got, density.reshape(3, -1).mean(1), rtol=1e-5)


def test_transition_logprob_by_hand():
  # One element: x = 1.5, mu = 0.5, s = 2:
  # -(1.5 - 0.5)^2 / (2 * 4) - log 2 - log(2 pi) / 2.
  want = -1.0 / 8.0 - math.log(2.0) - 0.5 * math.log(2.0 * math.pi)
  got = flow.transition_logprob(jnp.array([[1.5]]), jnp.array([[0.5]]), 2.0)
  np.testing.assert_allclose(got, [want], rtol=1e-6)
  assert abs(want - (-1.737086)) < 1e-6


def test_sde_std_and_mean_by_hand():
  # a = 0.7, t = 0.5, t' = 0.25: sigma = 0.7 sqrt(0.5 / 0.5) = 0.7,
  # s = 0.7 sqrt(0.25) = 0.35.
  sigma, std = flow.sde_std(0.5, 0.25, 0.7)
  np.testing.assert_allclose([sigma, std], [0.7, 0.35], rtol=1e-6)
  # x = 2, v = -1, sigma = 0.8: sigma^2 / (2t) = 0.64, x + (1 - t) v = 1.5,
  # bracket = -1 + 0.64 * 1.5 = -0.04, dt = -0.25: mu = 2 + 0.01 = 2.01.
  mu = flow.sde_mean(jnp.array([2.0]), jnp.array([-1.0]), 0.5, 0.25, 0.8)
  np.testing.assert_allclose(mu, [2.01], rtol=1e-6)
  # x' = mu + s z with z = 1, at sigma = 0.7: bracket = -1 + 0.49 * 1.5.
  x_next, mean, s = flow.sde_step(jnp.array([2.0]), jnp.array([-1.0]), 0.5,
                                  0.25, 0.7, jnp.array([1.0]))
  np.testing.assert_allclose(mean, [2.0 - 0.25 * (-1.0 + 0.49 * 1.5)],
                             rtol=1e-6)
  np.testing.assert_allclose(x_next, mean + 0.35, rtol=1e-6)
  np.testing.assert_allclose(s, 0.35, rtol=1e-6)


def test_per_row_times_broadcast_over_the_latent():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, 2, 2, 4)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(3, 2, 2, 4)), jnp.float32)
  z = jnp.asarray(rng.normal(size=(3, 2, 2, 4)), jnp.float32)
  t, t_next = jnp.array([1.0, 0.6, 0.3]), jnp.array([0.8, 0.4, 0.0])
  x_next, mean, std = flow.sde_step(x, v, t, t_next, 0.7, z)
  assert std.shape == (3,)
  for i in range(3):
    xi, mi, si = flow.sde_step(x[i:i + 1], v[i:i + 1], t[i], t_next[i], 0.7,
                               z[i:i + 1])
    np.testing.assert_allclose(x_next[i:i + 1], xi, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mean[i:i + 1], mi, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std[i], si, rtol=1e-6)
  np.testing.assert_allclose(flow.ode_step(x, v, t, t_next)[1],
                             x[1] - 0.2 * v[1], atol=1e-6)


@pytest.mark.parametrize('t, t_next', [(1.0, 0.9), (0.5, 0.3), (0.1, 0.0)])
def test_vanishing_noise_is_the_ode_step(t, t_next):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 3, 3, 2)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 3, 3, 2)), jnp.float32)
  z = jnp.asarray(rng.normal(size=(2, 3, 3, 2)), jnp.float32)
  x_next, mean, std = flow.sde_step(x, v, t, t_next, 1e-6, z)
  ode = flow.ode_step(x, v, t, t_next)
  np.testing.assert_allclose(mean, ode, atol=1e-5)
  np.testing.assert_allclose(x_next, ode, atol=1e-5)
  assert 0 < std < 1e-5


def test_sde_std_at_t_1_uses_the_next_time():
  # sigma = 0.7 sqrt(1 / (1 - 0.9)) = 0.7 sqrt(10); s = sigma sqrt(0.1) = 0.7.
  sigma, std = flow.sde_std(jnp.array([1.0, 0.5]), jnp.array([0.9, 0.4]), 0.7)
  assert np.all(np.isfinite(sigma)) and np.all(np.isfinite(std))
  np.testing.assert_allclose(sigma, [0.7 * math.sqrt(10.0), 0.7], rtol=1e-5)
  np.testing.assert_allclose(std, [0.7, 0.7 * math.sqrt(0.1)], rtol=1e-5)


def test_velocity_kl_is_the_gaussian_kl():
  rng = np.random.default_rng(3)
  m1 = rng.normal(size=(3, 2, 2, 2)).astype(np.float32)
  m2 = rng.normal(size=(3, 2, 2, 2)).astype(np.float32)
  s = np.array([0.2, 0.5, 1.5], np.float32)
  s1 = s2 = s[:, None, None, None]
  # KL(N(m1, s1^2) || N(m2, s2^2)) per element, averaged per row.
  kl = (np.log(s2 / s1) + (s1**2 + (m1 - m2)**2) / (2 * s2**2) - 0.5)
  got = flow.velocity_kl(jnp.asarray(m1), jnp.asarray(m2), jnp.asarray(s))
  np.testing.assert_allclose(got, kl.reshape(3, -1).mean(1), rtol=1e-5)
  np.testing.assert_allclose(flow.velocity_kl(m1, m1, 0.3), 0.0, atol=0)
  # By hand: one element, |mu - mu_ref| = 0.5, s = 0.25: 0.25 / 0.125 = 2.
  np.testing.assert_allclose(
      flow.velocity_kl(jnp.array([[0.5]]), jnp.array([[0.0]]), 0.25), [2.0],
      rtol=1e-6)


def test_sde_keeps_the_marginals_of_a_point_mass():
  # x_0 = c exactly: x_t = (1 - t) c + t eps ~ N((1 - t) c, t^2) and the
  # exact velocity is v = eps - c = (x_t - c) / t. A drift correction of the
  # wrong sign inflates the spread of x_t (to ~1.4 at t = 0.9 here).
  c, num_steps, b = 0.7, 20, 4096
  times = sampling.shifted_times(num_steps, 1.0)
  k1, k2 = jax.random.split(jax.random.key(0))
  out = flow.sde_rollout(lambda x, t: (x - c) / t[:, None],
                         jax.random.normal(k1, (b, 1)),
                         jax.random.normal(k2, (num_steps, b, 1)), times, 0.7)
  states, t = np.asarray(out['states'])[..., 0], np.asarray(times[:-1])
  # Euler-Maruyama is off by < 0.07 (most at the first, t = 1, step).
  np.testing.assert_allclose(states.std(1), t, atol=0.07)
  np.testing.assert_allclose(states.mean(1), (1 - t) * c, atol=0.03)
  final = np.asarray(out['latents'])
  assert abs(final.mean() - c) < 0.02 and final.std() < 0.05


def _linear_velocity(w, bias):
  """A nontrivial velocity: channel mixing of x plus a t-dependent shift."""
  def velocity_fn(x, t):
    return jnp.einsum('bhwc,cd->bhwd', x, w) + t[:, None, None, None] * bias
  return velocity_fn


def _numpy_rollout(w, bias, x, z, times, a):
  """The SDE chain and its log-probs in numpy, from the equations."""
  logps = []
  for k in range(len(times) - 1):
    t, t_next = float(times[k]), float(times[k + 1])
    v = np.einsum('bhwc,cd->bhwd', x, w) + t * bias
    sigma = a * math.sqrt(t / (1 - (t_next if t >= 1 else t)))
    s = sigma * math.sqrt(t - t_next)
    mu = x + (v + sigma**2 / (2 * t) * (x + (1 - t) * v)) * (t_next - t)
    x = mu + s * z[k]
    logps.append(stats.norm.logpdf(x, mu, s).reshape(x.shape[0], -1).mean(1))
  return x, np.stack(logps)


_MASK = (True, True, False, True, True, False)


def _random_linear(seed: int):
  """(w [2, 2], bias [2]) of a random `_linear_velocity`."""
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(2, 2)) * 0.5, jnp.float32),
          jnp.asarray(rng.normal(size=(2,)), jnp.float32))


@pytest.mark.parametrize('sde_steps', [None, _MASK])
def test_replay_equals_the_rollout(sde_steps):
  w, bias = _random_linear(4)
  times = sampling.shifted_times(6, 3.0)
  noise = jax.random.normal(jax.random.key(1), (4, 3, 3, 2))
  step_noise = jax.random.normal(jax.random.key(2), (6, 4, 3, 3, 2))
  chex.clear_trace_counter()  # Counted per code object, over parameters.

  @jax.jit
  @chex.assert_max_traces(n=1)
  def rollout(noise, step_noise, times):
    return flow.sde_rollout(_linear_velocity(w, bias), noise, step_noise,
                            times, 0.7, sde_steps=sde_steps)

  out = rollout(noise, step_noise, times)
  rollout(noise + 1.0, step_noise, times)  # No retrace.
  assert out['latents'].shape == (4, 3, 3, 2)
  assert out['logp'].shape == (6, 4)
  assert out['states'].shape == out['next_states'].shape == (6, 4, 3, 3, 2)
  np.testing.assert_array_equal(out['states'][1:], out['next_states'][:-1])
  logp, means, stds = flow.replay_logprob(
      _linear_velocity(w, bias), out['states'], out['next_states'], times,
      0.7, sde_steps=sde_steps)
  assert stds.shape == (6,)
  np.testing.assert_allclose(logp, out['logp'], atol=1e-5, rtol=0)
  np.testing.assert_allclose(means, out['means'], atol=1e-6, rtol=0)
  if sde_steps is None:
    x, want = _numpy_rollout(np.asarray(w), np.asarray(bias),
                             np.asarray(noise, np.float64),
                             np.asarray(step_noise, np.float64),
                             np.asarray(times, np.float64), 0.7)
    np.testing.assert_allclose(out['latents'], x, atol=1e-4)
    np.testing.assert_allclose(out['logp'], want, atol=1e-4)
  else:
    ode = ~np.array(sde_steps)
    np.testing.assert_array_equal(np.asarray(out['logp'])[ode], 0.0)
    np.testing.assert_array_equal(np.asarray(logp)[ode], 0.0)
    assert np.all(np.asarray(out['logp'])[~ode] != 0.0)
    v = _linear_velocity(w, bias)(out['states'][2], jnp.full((4,), times[2]))
    np.testing.assert_allclose(
        out['next_states'][2],
        flow.ode_step(out['states'][2], v, times[2], times[3]), atol=1e-6)
  # Changed parameters change the replayed log-probs.
  changed, _, _ = flow.replay_logprob(
      _linear_velocity(w * 1.1, bias), out['states'], out['next_states'],
      times, 0.7, sde_steps=sde_steps)
  assert np.abs(np.asarray(changed - logp)).max() > 1e-3


@pytest.mark.parametrize('sde_steps', [None, _MASK])
def test_replay_of_a_subset_equals_the_full_replay(sde_steps):
  w, bias = _random_linear(5)
  times = sampling.shifted_times(6, 3.0)
  out = flow.sde_rollout(
      _linear_velocity(w, bias), jax.random.normal(jax.random.key(1),
                                                   (4, 3, 3, 2)),
      jax.random.normal(jax.random.key(2), (6, 4, 3, 3, 2)), times, 0.7,
      sde_steps=sde_steps)
  # Each sample its own transitions, as the lvrpo stage draws them.
  steps_bk = np.array([[0, 2, 5], [1, 2, 3], [0, 4, 5], [2, 3, 5]])
  steps_kb = jnp.asarray(steps_bk.T)
  pick = lambda x_tb: jnp.take_along_axis(
      x_tb, steps_kb.reshape(steps_kb.shape + (1,) * (x_tb.ndim - 2)), 0)
  for weights in (w, w * 1.1):  # The rollout's parameters, then moved ones.
    velocity = _linear_velocity(weights, bias)
    full = flow.replay_logprob(velocity, out['states'], out['next_states'],
                               times, 0.7, sde_steps=sde_steps)
    logp, means, stds = jax.jit(
        lambda s, ns, st: flow.replay_logprob(velocity, s, ns, times, 0.7,
                                              sde_steps=sde_steps,
                                              steps_tb=st))(
            pick(out['states']), pick(out['next_states']), steps_kb)
    assert logp.shape == stds.shape == (3, 4)
    np.testing.assert_allclose(logp, pick(full[0]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(means, pick(full[1]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(stds, np.asarray(full[2])[steps_bk.T],
                               rtol=1e-6)
  np.testing.assert_allclose(pick(out['logp']), flow.replay_logprob(
      _linear_velocity(w, bias), pick(out['states']),
      pick(out['next_states']), times, 0.7, sde_steps=sde_steps,
      steps_tb=steps_kb)[0], atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match='steps_tb has shape'):
    flow.replay_logprob(_linear_velocity(w, bias), out['states'],
                        out['next_states'], times, 0.7, steps_tb=steps_kb)


def test_transition_subsets():
  keys = jax.random.split(jax.random.key(0), 64)
  steps = np.asarray(flow.transition_subsets(keys, 6, 3))
  assert steps.shape == (64, 3) and steps.dtype == np.int32
  assert np.all(np.diff(steps, axis=1) > 0)  # Distinct, ascending.
  assert steps.min() >= 0 and steps.max() <= 5
  np.testing.assert_array_equal(steps, flow.transition_subsets(keys, 6, 3))
  # Samples draw different subsets, and every transition gets drawn.
  assert len({tuple(row) for row in steps}) > 10
  assert set(steps.ravel()) == set(range(6))
  np.testing.assert_array_equal(flow.transition_subsets(keys[:2], 4, 4),
                                [[0, 1, 2, 3]] * 2)
  for count in (0, 7):
    with pytest.raises(ValueError, match='count must be in'):
      flow.transition_subsets(keys, 6, count)


def test_velocity_for_mode():
  v_c, v_u = jnp.array([[1.0, 2.0]]), jnp.array([[0.5, -1.0]])
  np.testing.assert_array_equal(
      flow.velocity_for_mode(v_c, None, 4.0, 'none'), v_c)
  np.testing.assert_array_equal(
      flow.velocity_for_mode(v_c, v_u, 4.0, 'cond_only'), v_c)
  # 0.5 + 4 (1 - 0.5) = 2.5; -1 + 4 (2 + 1) = 11.
  np.testing.assert_allclose(
      flow.velocity_for_mode(v_c, v_u, 4.0, 'guided'), [[2.5, 11.0]])

  def total(v_c, v_u):
    return flow.velocity_for_mode(v_c, v_u, 4.0, 'guided').sum()

  d_cond, d_uncond = jax.grad(total, argnums=(0, 1))(v_c, v_u)
  np.testing.assert_array_equal(d_cond, [[4.0, 4.0]])
  np.testing.assert_array_equal(d_uncond, [[0.0, 0.0]])
  assert flow.needs_unconditional('guided')
  assert not flow.needs_unconditional('none')
  assert not flow.needs_unconditional('cond_only')
  with pytest.raises(ValueError, match='guided.*cond_only'):
    flow.velocity_for_mode(v_c, v_u, 4.0, 'cfg')
  with pytest.raises(ValueError, match='valid'):
    flow.needs_unconditional('cfg')
  with pytest.raises(ValueError, match='unconditional'):
    flow.velocity_for_mode(v_c, None, 4.0, 'guided')
  with pytest.raises(ValueError, match='unconditional'):
    flow.velocity_for_mode(v_c, v_u, 4.0, 'none')
  # BAGEL's guidance: only inside the interval; renormalized to |v_c|.
  bagel = sampling.Guidance(4.0, interval=(0.5, 1.0), renorm_min=0.0)
  t = jnp.array([0.7])
  got = flow.velocity_for_mode(v_c, v_u, bagel, 'guided', t)
  np.testing.assert_allclose(got, np.array([[2.5, 11.0]]) * np.sqrt(5.0) / (
      np.sqrt(2.5 ** 2 + 11.0 ** 2)), rtol=1e-6)
  np.testing.assert_allclose(
      flow.velocity_for_mode(v_c, v_u, bagel, 'guided', jnp.array([0.3])),
      v_c)
  with pytest.raises(ValueError, match='needs the times'):
    flow.velocity_for_mode(v_c, v_u, bagel, 'guided')
