"""What every training stage reads from the config, in one place.

A stage module supplies its model, loss, data source and per-example
transform; `run` builds the mesh, the loop and optimizer settings and the
input stream from the config's shared sections (`mesh`, `train`, `data`)
and the stage's own section (`steps`, `batch_size`, `accum_steps`,
`learning_rate`, `warmup_steps`, optional `weight_decay`).
"""

import os
from typing import Callable

import jax
from flax import nnx

from lvrpo_jax import sharding
from lvrpo_jax.data import pipeline
from lvrpo_jax.train import loop
from lvrpo_jax.train import optimizer


def mesh(config) -> jax.sharding.Mesh:
  return sharding.make_mesh(config.mesh.data, config.mesh.fsdp,
                            config.mesh.tensor)


def batches(config, section, source, transform):
  """This process's share of `section.batch_size` examples of `source`."""
  return iter(pipeline.batches(
      source, batch_size=section.batch_size // jax.process_count(),
      seed=config.data.shuffle_seed, transforms=(transform,),
      worker_count=config.data.worker_count))


def run(name: str, config, workdir: str, *,
        make_model: Callable[[], nnx.Module], loss_fn: Callable,
        source=None, transform=None, make_batches=None,
        tokens_per_step: int,
        require_complete: bool = False, init_from=None, prepare=None,
        updates_per_step: int = 1) -> nnx.Module:
  """`loop.run` for stage `name` with the settings of `config[name]`.

  Also writes `workdir/<name>/config.json`, the run's whole config, so that
  a stage directory alone says how to rebuild its model (the inference
  CLIs read it). Batches come from `make_batches` or else from `source`
  and `transform` (`batches`). `init_from`, `prepare` and
  `updates_per_step` go to `loop.run`; the learning-rate schedule counts
  updates.
  """
  section = config[name]
  if not require_complete and jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, name), exist_ok=True)
    with open(os.path.join(workdir, name, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  return loop.run(
      name, workdir, make_model=make_model, loss_fn=loss_fn,
      make_batches=make_batches or (
          lambda: batches(config, section, source, transform)),
      optim=optimizer.OptimizerConfig(
          learning_rate=section.learning_rate,
          warmup_steps=section.warmup_steps * updates_per_step,
          total_steps=section.steps * updates_per_step,
          weight_decay=section.get('weight_decay', 0.0)),
      cfg=loop.LoopConfig(
          total_steps=section.steps,
          accum_steps=section.get('accum_steps', 1),
          log_every=config.train.log_every,
          checkpoint_every=config.train.checkpoint_every,
          keep_checkpoints=config.train.keep_checkpoints,
          max_bad_steps=config.train.max_bad_steps, seed=config.seed),
      mesh=mesh(config), tokens_per_step=tokens_per_step,
      require_complete=require_complete, init_from=init_from,
      prepare=prepare, updates_per_step=updates_per_step)
