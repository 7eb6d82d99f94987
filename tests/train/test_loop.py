"""The stage loop: a crashed run resumes bitwise, a complete one is skipped
(whatever its input pipeline), a run of non-finite updates aborts with a
clear message."""

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

  def __init__(self, fail_at=None, nan_from=None, nan_until=None):
    self.index, self.fail_at = 0, fail_at
    self.nan_from, self.nan_until = nan_from, nan_until

  def __next__(self):
    self.index += 1
    if self.index == self.fail_at:
      raise RuntimeError('simulated crash')
    rng = np.random.default_rng(self.index)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = x[:, :2] * 2 - 1
    if (self.nan_from is not None and self.index >= self.nan_from
        and (self.nan_until is None or self.index < self.nan_until)):
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


def _run(workdir, batches, total=12, name='toy', log_every=1, **kwargs):
  cfg = loop.LoopConfig(total_steps=total, log_every=log_every,
                        checkpoint_every=4, max_bad_steps=3)
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


class WorkerBatches(Batches):
  """The same stream read another way, whose state has another shape (as
  Grain's iterator with worker processes keeps one state per worker)."""

  def get_state(self):
    return {'workers': [{'index': self.index}]}

  def set_state(self, state):
    self.index = state['workers'][0]['index']


def test_a_complete_stage_restores_no_input_position(tmp_path):
  # Changing data.worker_count after a stage finished must not break the
  # later stages that restore it.
  first = _params(_run(tmp_path, Batches()))
  again = _params(_run(tmp_path, WorkerBatches(fail_at=1)))
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_resuming_with_another_pipeline_is_a_clear_error(tmp_path):
  with pytest.raises(RuntimeError, match='simulated crash'):
    _run(tmp_path, Batches(fail_at=7))  # Checkpoint at step 4.
  with pytest.raises(ValueError, match=r"toy: the checkpoint's input-"
                     r'pipeline position does not fit .*KeyError.*'
                     r'data\.worker_count'):
    _run(tmp_path, WorkerBatches())


def test_consecutive_non_finite_updates_abort(tmp_path):
  with pytest.raises(loop.NonFiniteError,
                     match='3 consecutive non-finite updates by step 7'):
    _run(tmp_path, Batches(nan_from=5))


def test_a_streak_between_logging_steps_still_aborts(tmp_path):
  # Steps 2-5 are non-finite, 6 is fine again: the line at step 6 reports
  # the window's longest streak (4), not the last step's (0).
  with pytest.raises(loop.NonFiniteError,
                     match='4 consecutive non-finite updates by step 6'):
    _run(tmp_path, Batches(nan_from=2, nan_until=6), log_every=6)


def test_a_metrics_line_summarizes_its_window():
  window = [({'loss': 1.0, 'finite': True, 'skipped': 0, 'bad_streak': 0},
             {'gen/r_ins/mean': 0.25}),
            ({'loss': np.nan, 'finite': False, 'skipped': 1,
              'bad_streak': 1}, {'gen/r_ins/mean': 0.5}),
            ({'loss': 3.0, 'finite': True, 'skipped': 1, 'bad_streak': 0},
             {'gen/r_ins/mean': 0.75, 'time/update': 2.0})]
  out = loop.summarize(window)
  assert out['time/update'] == 2.0  # Only the last step has it.
  assert out['gen/r_ins/mean'] == 0.5 and out['finite'] == pytest.approx(2 / 3)
  assert out['loss'] == 2.0  # The skipped step's NaN is left out.
  assert (out['bad_streak'], out['skipped'], out['last_loss']) == (1, 1, 3.0)


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
