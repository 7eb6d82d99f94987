"""The stage loop: a crashed run resumes bitwise, a complete one is skipped,
a run of non-finite updates aborts with a clear message."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvrpo_jax import sharding
from lvrpo_jax.train import loop
from lvrpo_jax.train import optimizer

OPT = optimizer.OptimizerConfig(learning_rate=0.05, warmup_steps=2,
                                total_steps=12, weight_decay=0.01)


class Batches:
  """A checkpointable iterator of regression batches, as Grain's are.

  `fail_at`: raise on that call of `next`, to simulate a crash.
  """

  def __init__(self, fail_at=None, nan_from=None):
    self.index, self.fail_at, self.nan_from = 0, fail_at, nan_from

  def __next__(self):
    self.index += 1
    if self.index == self.fail_at:
      raise RuntimeError('simulated crash')
    rng = np.random.default_rng(self.index)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = x[:, :2] * 2 - 1
    if self.nan_from is not None and self.index >= self.nan_from:
      y = y * np.nan
    return {'x': x, 'y': y}

  def get_state(self):
    return {'index': self.index}

  def set_state(self, state):
    self.index = state['index']


def _loss(model, batch, rng):
  del rng
  err = model(batch['x']) - batch['y']
  return (err ** 2).sum(), (jnp.asarray(err.size, jnp.float32), {})


def _run(workdir, batches, total=12, name='toy', **kwargs):
  cfg = loop.LoopConfig(total_steps=total, log_every=1, checkpoint_every=4,
                        max_bad_steps=3)
  return loop.run(
      name, str(workdir),
      make_model=lambda: nnx.Linear(4, 2, rngs=nnx.Rngs(0)), loss_fn=_loss,
      make_batches=lambda: batches, optim=OPT, cfg=cfg,
      mesh=sharding.make_mesh(), tokens_per_step=8, **kwargs)


def _params(model):
  return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


def test_a_crashed_run_resumes_to_the_same_parameters(tmp_path):
  straight = _params(_run(tmp_path / 'a', Batches()))
  with pytest.raises(RuntimeError, match='simulated crash'):
    _run(tmp_path / 'b', Batches(fail_at=7))  # Checkpoint at step 4.
  resumed = _params(_run(tmp_path / 'b', Batches()))
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_a_complete_stage_is_skipped(tmp_path, capsys):
  first = _params(_run(tmp_path, Batches()))
  again = _params(_run(tmp_path, Batches(fail_at=1)))  # Never asked.
  assert 'complete at step 12; skipped' in capsys.readouterr().out
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_consecutive_non_finite_updates_abort(tmp_path):
  with pytest.raises(loop.NonFiniteError,
                     match='3 consecutive non-finite updates at step 7'):
    _run(tmp_path, Batches(nan_from=5))


def test_init_from_starts_a_fresh_run_only(tmp_path):
  earlier = _run(tmp_path, Batches(), name='first')
  calls = []

  def init_from():
    calls.append(1)
    return earlier

  # Zero steps to train: the stage is only initialized and saved.
  started = _params(_run(tmp_path, Batches(), total=0, name='second',
                         init_from=init_from))
  for a, b in zip(jax.tree.leaves(_params(earlier)),
                  jax.tree.leaves(started)):
    np.testing.assert_array_equal(a, b)
  # The earlier model still works: its arrays were copied, not donated.
  assert np.isfinite(np.asarray(earlier(jnp.ones((1, 4))))).all()
  trained = _params(_run(tmp_path, Batches(), total=3, name='third',
                         init_from=init_from))
  assert calls == [1, 1]
  # Resuming the complete stage restores its checkpoint, not init_from.
  again = _params(_run(tmp_path, Batches(), total=3, name='third',
                       init_from=init_from))
  assert calls == [1, 1]
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
