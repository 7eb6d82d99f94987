"""The optimizer and the train step: schedule and masks by hand, exact
accumulation, non-finite skips, one trace, sharded == single device."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lvrpo_jax import sharding
from lvrpo_jax.models import presets
from lvrpo_jax.models import unified
from lvrpo_jax.train import optimizer
from lvrpo_jax.train import step as step_lib

OPT = optimizer.OptimizerConfig(learning_rate=1e-2, warmup_steps=2,
                                total_steps=10, weight_decay=0.1,
                                clip_norm=1.0)


class Regressor(nnx.Module):
  """A linear model: y = x W + b."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 2, rngs=rngs)


def _regression_loss(model, batch, rng):
  del rng
  err = model.dense(batch['x']) - batch['y']
  # A sum and a count: the step divides once, after accumulating.
  return (err ** 2).sum(), (jnp.asarray(err.size, jnp.float32),
                            {'max_err': jnp.abs(err).max()})


def _data(n=16, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4)).astype(np.float32)
  return {'x': jnp.asarray(x), 'y': jnp.asarray(x[:, :2] * 3 + 1)}


def _setup(tx, seed=0):
  model = Regressor(nnx.Rngs(seed))
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  state = step_lib.init_state(model, tx, seed)
  return step_lib.make_train_step(graphdef, rest, _regression_loss, tx), state


def test_schedule_by_hand():
  lr = optimizer.schedule(OPT)
  # Warmup 0 -> 1e-2 over 2 steps; then cosine from 1e-2 to 1e-3 over 8.
  assert float(lr(0)) == pytest.approx(0.0)
  assert float(lr(1)) == pytest.approx(5e-3)
  assert float(lr(2)) == pytest.approx(1e-2)
  assert float(lr(6)) == pytest.approx(1e-3 + 0.5 * 9e-3)  # Half way.
  assert float(lr(10)) == pytest.approx(1e-3)


def test_weight_decay_skips_vectors():
  params = {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones((2,)),
            'scale': jnp.ones((2,))}
  assert optimizer.decay_mask(params) == {'kernel': True, 'bias': False,
                                          'scale': False}


def test_clipping_by_global_norm_by_hand():
  cfg = optimizer.OptimizerConfig(learning_rate=1.0, warmup_steps=0,
                                  total_steps=10, b1=0.0, b2=0.0, eps=0.0,
                                  weight_decay=0.0, clip_norm=1.0)
  tx = optimizer.make(cfg)
  # Gradient (3, 4) has norm 5 -> clipped to (0.6, 0.8); with b1 = b2 = 0
  # Adam's update is sign(g) * lr, so check the clip on the first stage.
  clip = optax.clip_by_global_norm(1.0)
  clipped, _ = clip.update(jnp.array([3.0, 4.0]), clip.init(None))
  np.testing.assert_allclose(clipped, [0.6, 0.8], rtol=1e-6)
  updates, _ = tx.update(jnp.array([3.0, 4.0]), tx.init(jnp.zeros(2)),
                         jnp.zeros(2))
  np.testing.assert_allclose(updates, [-1.0, -1.0], rtol=1e-5)


def test_accumulation_is_exact():
  tx = optimizer.make(OPT)
  train_step, state = _setup(tx)
  batch = _data()
  one, _ = jax.jit(train_step)(state, step_lib.micro_batches(batch, 1))
  train_step, state = _setup(tx)
  four, metrics = jax.jit(train_step)(state, step_lib.micro_batches(batch, 4))
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert float(metrics['count']) == 32


def test_a_non_finite_loss_skips_the_update_and_is_counted():
  tx = optimizer.make(OPT)
  train_step, state = _setup(tx)
  step = jax.jit(train_step)
  good = step_lib.micro_batches(_data(), 2)
  bad = jax.tree.map(lambda x: x.at[0, 0, 0].set(jnp.nan), good)
  state, _ = step(state, good)
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  for streak in (1, 2):
    state, metrics = step(state, bad)
    assert not bool(metrics['finite'])
    assert int(state.bad_streak) == streak and int(state.skipped) == streak
    after = jax.tree.map(np.asarray, (state.params, state.opt_state))
    chex.assert_trees_all_equal(before, after)
  state, metrics = step(state, good)
  assert bool(metrics['finite']) and int(state.bad_streak) == 0
  assert int(state.skipped) == 2 and int(state.step) == 4


def test_loss_decreases_and_the_step_traces_once():
  tx = optimizer.make(optimizer.OptimizerConfig(
      learning_rate=0.1, warmup_steps=0, total_steps=100, weight_decay=0.0))
  train_step, state = _setup(tx)
  step = jax.jit(chex.assert_max_traces(train_step, n=1))
  losses = []
  for i in range(100):
    state, metrics = step(state, step_lib.micro_batches(_data(seed=i), 2))
    losses.append(float(metrics['loss']))
  # A noiseless linear target: Adam fits it almost exactly.
  assert losses[-1] < 0.01 * losses[0], losses[::10]


def _unified_loss(model, batch, rng):
  total, count = unified.flow_loss(
      model, batch['prompt'], batch['latents'],
      jax.random.split(rng, batch['latents'].shape[0]))
  return total, (count, {})


def test_sharded_training_equals_single_device(compile_sharded):
  # micro: every sharded axis of the tiny preset, in two thirds of its
  # compile time (test_sharding.py checks the tiny preset's shardings).
  cfg = presets.micro()
  # SGD: the update is linear in the gradient, so sharded and single-device
  # steps differ only by float summation order. Adam divides by sqrt(v) +
  # eps, which turns those last-bit differences in near-zero gradients (rare
  # embedding rows) into visible ones, testing Adam rather than sharding.
  tx = optax.sgd(0.5)
  make = lambda: unified.UnifiedModel(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batches = [step_lib.micro_batches({
      'prompt': jnp.asarray(rng.integers(6, 51, (8, 6)), jnp.int32),
      'latents': jnp.asarray(rng.normal(size=(8, 4, 4, 4)), jnp.float32),
  }, 2) for _ in range(3)]

  def run(model, compile_fn):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    state = step_lib.init_state(model, tx, seed=0)
    train_step = step_lib.make_train_step(graphdef, rest, _unified_loss, tx)
    step, state = compile_fn(train_step, state)
    for batch in batches:
      state, metrics = step(state, batch)
    return state, metrics

  single, single_metrics = run(make(), lambda f, s: (jax.jit(f), s))
  mesh = sharding.make_mesh(2, 2, 2)

  sharded = lambda f, state: compile_sharded(f, state, tx, mesh)
  multi, multi_metrics = run(sharding.init_sharded(make, mesh), sharded)
  kernel = multi.params['mot']['layers'][0]['und']['gate']['kernel']
  assert kernel[...].sharding.spec == jax.sharding.PartitionSpec(
      'fsdp', 'tensor')
  np.testing.assert_allclose(multi_metrics['loss'], single_metrics['loss'],
                             rtol=1e-5)
  for a, b in zip(jax.tree.leaves(single.params),
                  jax.tree.leaves(multi.params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_bfloat16_compute_updates_float32_master_weights():
  """bf16 compute: gradients, parameters and optimizer state stay float32,
  so an update far below bf16's resolution of a parameter still lands, and
  equals the float32 run's update up to bf16 rounding of the gradient."""
  cfg = presets.micro()
  rng = np.random.default_rng(0)
  batch = step_lib.micro_batches({
      'prompt': jnp.asarray(rng.integers(6, 51, (4, 6)), jnp.int32),
      'latents': jnp.asarray(rng.normal(size=(4, 4, 4, 4)), jnp.float32),
  }, 1)
  # SGD with a small rate: updates of ~1e-6 on parameters of ~2e-2, far
  # below bf16's spacing there (~1e-4), far above float32's (~2e-9).
  tx = optax.sgd(1e-2)

  def one_step(dtype):
    model = unified.UnifiedModel(presets.with_dtype(cfg, dtype),
                                 rngs=nnx.Rngs(0))
    # A non-zero velocity head, so every layer gets a gradient.
    head = model.velocity_out.kernel
    head[...] = jax.random.normal(jax.random.key(1), head.shape) * 0.1
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    state = step_lib.init_state(model, tx, seed=0)
    before = jax.tree.map(np.asarray, state.params)
    step = jax.jit(step_lib.make_train_step(graphdef, rest, _unified_loss,
                                            tx))
    state, metrics = step(state, batch)
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
            } <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
    delta = jax.tree.map(lambda new, old: np.asarray(new) - old,
                         state.params, before)
    return float(metrics['loss']), before, delta

  loss32, _, delta32 = one_step('float32')
  loss16, before, delta16 = one_step('bfloat16')
  np.testing.assert_allclose(loss16, loss32, rtol=1e-2)
  gate = lambda d: np.asarray(d['mot']['layers'][0]['gen']['gate']['kernel'])
  bf16 = lambda x: x.astype(jnp.bfloat16)
  # bf16 parameters would have dropped most of this layer's update...
  assert np.mean(bf16(gate(before) + gate(delta16)) == bf16(gate(before))
                 ) > 0.9
  # ...which the float32 master copy keeps.
  assert np.mean(gate(delta16) != 0) > 0.9
  flat32 = np.concatenate([x.ravel() for x in jax.tree.leaves(delta32)])
  flat16 = np.concatenate([x.ravel() for x in jax.tree.leaves(delta16)])
  # The whole update's direction and size match (bf16 gradient rounding).
  cos = flat16 @ flat32 / np.linalg.norm(flat16) / np.linalg.norm(flat32)
  assert cos > 0.99, cos
  np.testing.assert_allclose(np.linalg.norm(flat16), np.linalg.norm(flat32),
                             rtol=2e-2)
