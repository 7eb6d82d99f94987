"""What every training stage reads from the config, in one place.

A stage module supplies its model, loss, data source and per-example
transform; `run` builds the mesh, the loop and optimizer settings and the
input stream from the config's shared sections (`mesh`, `train`, `data`)
and the stage's own section (`steps`, `batch_size`, `accum_steps`,
`learning_rate`, `warmup_steps`, optional `weight_decay`).
"""

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


def run(name: str, config, workdir: str, *,
        make_model: Callable[[], nnx.Module], loss_fn: Callable, source,
        transform, tokens_per_step: int,
        require_complete: bool = False) -> nnx.Module:
  """`loop.run` for stage `name` with the settings of `config[name]`."""
  section = config[name]
  return loop.run(
      name, workdir, make_model=make_model, loss_fn=loss_fn,
      make_batches=lambda: iter(pipeline.batches(
          source, batch_size=section.batch_size // jax.process_count(),
          seed=config.data.shuffle_seed, transforms=(transform,),
          worker_count=config.data.worker_count)),
      optim=optimizer.OptimizerConfig(
          learning_rate=section.learning_rate,
          warmup_steps=section.warmup_steps, total_steps=section.steps,
          weight_decay=section.get('weight_decay', 0.0)),
      cfg=loop.LoopConfig(
          total_steps=section.steps, accum_steps=section.accum_steps,
          log_every=config.train.log_every,
          checkpoint_every=config.train.checkpoint_every,
          keep_checkpoints=config.train.keep_checkpoints,
          max_bad_steps=config.train.max_bad_steps, seed=config.seed),
      mesh=mesh(config), tokens_per_step=tokens_per_step,
      require_complete=require_complete)
