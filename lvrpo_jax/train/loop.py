"""The training loop every stage runs: one function, top to bottom.

    model = loop.run('vae', workdir, make_model=..., loss_fn=...,
                     make_batches=..., optim=..., cfg=..., mesh=...)

It builds the model already sharded, restores the newest checkpoint (state
and input iterator) if there is one, returns at once when the stage is
complete, and otherwise trains: one jitted, donated step per batch, metrics
to TensorBoard/JSONL with a progress bar, a checkpoint every
`checkpoint_every` steps, SIGTERM (preemption) answered by a final save and
exit status 0, and an abort with a clear message once `max_bad_steps`
consecutive non-finite updates have been skipped (the step skips each one;
the streaks are read at logging steps, so the abort comes within
`log_every` steps of reaching the limit without a host sync every step).

A metrics line summarizes the steps since the line before: the mean of each
metric (the step's and `prepare`'s; one step's rewards are noisy), the
longest non-finite streak, and the running totals as of the last step.

Batches come from a Grain iterator as process-local numpy arrays [b, ...];
they become global arrays [A, b * processes / A, ...] sharded over
('data', 'fsdp'), so multi-host runs need no other code path.
"""

import dataclasses
import os
import sys
from typing import Callable

import jax
import numpy as np
from absl import logging
from flax import nnx

from lvrpo_jax import checkpoint as checkpoint_lib
from lvrpo_jax import metrics as metrics_lib
from lvrpo_jax import sharding
from lvrpo_jax.train import optimizer
from lvrpo_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  total_steps: int
  accum_steps: int = 1
  log_every: int = 50
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  max_bad_steps: int = 10  # Consecutive non-finite updates before abort.
  seed: int = 0


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite losses or gradients."""


class StageIncompleteError(FileNotFoundError):
  """A later stage asked for a model its stage has not finished (its final
  checkpoint is missing)."""


def run(name: str, workdir: str, *, make_model: Callable[[], nnx.Module],
        loss_fn: Callable, make_batches: Callable,
        optim: optimizer.OptimizerConfig, cfg: LoopConfig,
        mesh: jax.sharding.Mesh, tokens_per_step: int,
        flops_per_step: float | None = None,
        require_complete: bool = False,
        init_from: Callable[[], nnx.Module] | None = None,
        prepare: Callable | None = None,
        updates_per_step: int = 1) -> nnx.Module:
  """Trains (or resumes, or skips) stage `name`; returns the trained model.

  Args:
    name: the stage; it writes `workdir/<name>/`.
    make_model: () -> module, deterministic (seeded inside).
    loss_fn: (model, micro_batch, rng) -> (loss_sum, (count, aux dict)).
    make_batches: () -> a checkpointable iterator of dicts of numpy arrays
      with leading dimension b (this process's share of the batch).
    optim, cfg: optimizer and loop settings.
    mesh: the device mesh.
    tokens_per_step: tokens (or examples) of one global batch, for
      throughput; flops_per_step: model FLOPs of a step, for MFU.
    require_complete: only restore: a stage not trained to the end raises
      (a later stage asking for a frozen model).
    init_from: () -> a trained module of the same graph whose parameters
      start the run (an earlier stage's model); without it, make_model's.
      A checkpoint of this stage, when there is one, wins.
    prepare: (state, batch) -> (batch, metrics): turns the input batch into
      the step's batch with the current state (an RL stage's rollouts and
      rewards); its metrics (host numbers) are logged with the step's.
    updates_per_step: optimizer updates on each batch (GRPO's mu;
      `step_lib.repeat_updates`).

  Raises:
    StageIncompleteError: with `require_complete`, naming the stage and its
      checkpoint directory.
  """
  stage_dir = os.path.join(workdir, name)
  tx = optimizer.make(optim)
  model = sharding.init_sharded(make_model, mesh)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  state = step_lib.init_state(model, tx, cfg.seed)
  step_fn, (shardings, batch_sharding) = step_lib.compile_train_step(
      step_lib.repeat_updates(
          step_lib.make_train_step(graphdef, rest, loss_fn, tx),
          updates_per_step), state, tx, mesh)
  state = jax.device_put(state, shardings)
  batches = make_batches()
  # The context closes the checkpointer on every way out (an exception, a
  # preemption exit, the end), which waits for pending async saves.
  with checkpoint_lib.Checkpointer(
      os.path.join(stage_dir, 'checkpoints'), keep=cfg.keep_checkpoints,
      save_every=cfg.checkpoint_every) as ckpt:
    if ckpt.latest_step() is not None:
      abstract = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
          state, shardings)
      state, data_state = ckpt.restore(abstract)
      if int(state.step) < cfg.total_steps:  # A complete stage reads none.
        _set_data_state(name, batches, data_state)
    elif init_from is not None:
      # Only a fresh run loads the earlier stage. Copies in this run's
      # layout: the state is donated, and the earlier stage's arrays may
      # still serve (a frozen reference model). The optimizer state does not
      # depend on the parameters' values, only on their shapes.
      state = dataclasses.replace(state, params=jax.tree.map(
          lambda new, old: jax.device_put(new, old.sharding,
                                          may_alias=False),
          nnx.state(init_from(), nnx.Param), state.params))
    start = int(state.step)
    if require_complete and start < cfg.total_steps:
      raise StageIncompleteError(
          f'stage {name!r} is not trained ({start} of {cfg.total_steps} '
          f'steps in {ckpt.directory}); run it first')
    if start >= cfg.total_steps:
      print(f'  {name}: complete at step {start}; skipped', flush=True)
    else:
      if start:
        print(f'  {name}: resuming at step {start}', flush=True)
      state = _train(name, stage_dir, state, step_fn, batches, ckpt, cfg,
                     batch_sharding, tokens_per_step, flops_per_step,
                     prepare)
  return nnx.merge(graphdef, state.params, rest)


def _train(name, stage_dir, state, step_fn, batches, ckpt, cfg,
           batch_sharding, tokens_per_step, flops_per_step, prepare=None):
  """Steps from the state's step to cfg.total_steps; returns the state."""
  start = int(state.step)

  def global_batch(local):
    arrays = step_lib.micro_batches(local, cfg.accum_steps)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding, x),
        arrays)

  speed = metrics_lib.Throughput(
      tokens_per_step=tokens_per_step, num_devices=jax.device_count(),
      flops_per_step=flops_per_step,
      peak_flops_per_device=metrics_lib.peak_flops_per_device())
  with (checkpoint_lib.sigterm_as_flag(),
        metrics_lib.MetricsWriter(stage_dir, purge_step=start + 1) as writer,
        metrics_lib.ProgressBar(cfg.total_steps, name,
                                initial_step=start) as progress):
    window = []  # (device metrics, host metrics) since the last line.
    for step in range(start + 1, cfg.total_steps + 1):
      batch, extra = global_batch(next(batches)), {}
      if prepare is not None:
        batch, extra = prepare(state, batch)
      state, metrics = step_fn(state, batch)
      window.append((metrics, extra))
      loss = None
      # After the first (compiling) step, then every log_every steps.
      if (step == start + 1 or step % cfg.log_every == 0
          or step == cfg.total_steps):
        values = summarize(jax.device_get(window))  # Waits for the step.
        window = []
        writer.write(step, {**values, **speed.update(step)})
        loss = float(values['loss'])
        if int(values['bad_streak']) >= cfg.max_bad_steps:
          raise NonFiniteError(
              f'{name}: {int(values["bad_streak"])} consecutive non-finite '
              f'updates by step {step} (limit max_bad_steps='
              f'{cfg.max_bad_steps}); last loss {values["last_loss"]}')
      progress.update(step, loss=loss)
      ckpt.save(step, state, batches.get_state())
      if checkpoint_lib.should_stop(step):
        ckpt.save(step, state, batches.get_state(), force=True)
        logging.warning('%s: preempted; saved step %d', name, step)
        print(f'  {name}: preempted at step {step}; checkpoint saved',
              flush=True)
        sys.exit(0)  # The Checkpointer's context waits for the save.
  ckpt.save(cfg.total_steps, state, batches.get_state(), force=True)
  return state


def _set_data_state(name: str, batches, data_state) -> None:
  """Puts the input pipeline where the checkpoint left it; a state saved by
  a differently built pipeline (Grain's worker processes keep one state
  each) is a clear error, not a KeyError from inside Grain."""
  try:
    batches.set_state(data_state)
  except (KeyError, ValueError, TypeError, IndexError) as e:
    raise ValueError(
        f'{name}: the checkpoint\'s input-pipeline position does not fit '
        f'this pipeline ({type(e).__name__}: {e}); resume with the data '
        'settings it was saved with (data.worker_count, batch size)') from e


def summarize(window):
  """One metrics line from [(step metrics, host metrics)] of the steps since
  the last line: the mean of each metric over the steps where it is finite
  (a skipped step's loss is not; `finite` becomes the share of finite
  steps), except `bad_streak` (the longest streak reached), `skipped` (the
  total so far) and `last_loss` (the last step's loss)."""
  rows = [{**device, **host} for device, host in window]
  out = {}
  for key in dict.fromkeys(k for r in rows for k in r):
    # A host metric may be missing on some steps (e.g. the first one's
    # update time): the mean is over the steps that have it.
    values = np.array([float(r[key]) for r in rows if key in r])
    finite = values[np.isfinite(values)]
    out[key] = float(finite.mean() if finite.size else values[-1])
  out['bad_streak'] = max(int(r['bad_streak']) for r in rows)
  out['skipped'] = int(rows[-1]['skipped'])
  out['last_loss'] = float(rows[-1]['loss'])
  return out
