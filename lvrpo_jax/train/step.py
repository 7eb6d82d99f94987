"""The train state and the one pure train step every stage jits.

A stage supplies `loss_fn(model, batch, rng) -> (loss_sum, (count, aux))`:
a *sum* over its examples/tokens and how many there were, so micro-batch
accumulation is exact — the step's loss is sum(loss_sum) / sum(count) over
all micro-batches, and its gradient is the gradient of that, whatever the
split. `aux` is a dict of scalars, averaged over micro-batches.

The step skips an update whose loss or gradient is not finite (parameters
and optimizer state are kept), counts it, and tracks the streak of
consecutive skips; the trainer aborts when the streak reaches its limit.

Batches carry a leading micro-batch axis: leaves [A, B/A, ...].
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lvrpo_jax import sharding as sharding_lib


@dataclasses.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator.

  Attributes:
    step: int32 scalar, updates attempted so far (skipped ones included).
    params: the model's nnx.Param state.
    opt_state: the optax state.
    rng: uint32 key data of the run's base key (`jax.random.key_data`).
    skipped: int32, non-finite updates skipped in total.
    bad_streak: int32, consecutive non-finite updates up to now.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  skipped: jax.Array
  bad_streak: jax.Array


jax.tree_util.register_dataclass(
    TrainState, data_fields=['step', 'params', 'opt_state', 'rng', 'skipped',
                             'bad_streak'], meta_fields=[])


def init_state(model: nnx.Module, tx: optax.GradientTransformation,
               seed: int) -> TrainState:
  params = nnx.state(model, nnx.Param)
  # Three separate zeros: the state is donated, and one buffer donated
  # twice is an error.
  zero = lambda: jnp.zeros((), jnp.int32)
  return TrainState(zero(), params, tx.init(params),
                    jax.random.key_data(jax.random.key(seed)), zero(), zero())


def micro_batches(batch, accum_steps: int):
  """Splits leaves [B, ...] into [A, B/A, ...]; B must divide."""
  def split(x):
    if x.shape[0] % accum_steps:
      raise ValueError(f'batch of {x.shape[0]} does not split into '
                       f'{accum_steps} micro-batches')
    return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])
  return jax.tree.map(split, batch)


def make_train_step(graphdef, rest, loss_fn: Callable,
                    tx: optax.GradientTransformation):
  """The pure step (state, batch [A, b, ...]) -> (state, metrics).

  Args:
    graphdef, rest: from `nnx.split(model, nnx.Param, ...)`; `rest` (the
      model's non-parameter state) is constant during training.
    loss_fn: (model, micro_batch, rng) -> (loss_sum, (count, aux dict)).
    tx: the optimizer.
  """
  def micro_loss(params, micro, rng):
    model = nnx.merge(graphdef, params, rest)
    loss_sum, (count, aux) = loss_fn(model, micro, rng)
    return loss_sum, (count, aux)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def train_step(state: TrainState, batch):
    # Device-count invariant randomness: from (seed, step, micro-batch).
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng),
                                  state.step)
    accum = jax.tree.leaves(batch)[0].shape[0]

    def body(carry, xs):
      grads, total, count = carry
      index, micro = xs
      (s, (c, aux)), g = grad_fn(state.params,
                                 micro, jax.random.fold_in(step_key, index))
      grads = jax.tree.map(jnp.add, grads, g)
      return (grads, total + s, count + c), aux

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, total, count), aux = jax.lax.scan(
        body, init, (jnp.arange(accum), batch))
    count = jnp.maximum(count, 1.0)
    loss = total / count
    grads = jax.tree.map(lambda g: g / count, grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Non-finite gradients would poison the optimizer moments even in a
    # discarded update under jnp.where's both-branches evaluation: zero them.
    safe = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    updates, opt_state = tx.update(safe, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(
        lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        rng=state.rng,
        skipped=state.skipped + (~finite).astype(jnp.int32),
        bad_streak=jnp.where(finite, 0, state.bad_streak + 1))
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'count': count,
               'finite': finite, 'skipped': new_state.skipped,
               'bad_streak': new_state.bad_streak,
               **{k: v.mean() for k, v in aux.items()}}
    return new_state, metrics

  return train_step


def repeat_updates(train_step, num_updates: int):
  """GRPO's mu inner updates on one batch, as one step.

  The batch (rollouts, their log-probs under pi_old and advantages) stays
  fixed while the parameters move, so ratios leave 1 after the first
  update. The state's `step` counts batches, as the loop expects (the
  optimizer's own count, and so its schedule, counts updates). Metrics are
  the last update's, except `*replay_gap`, the first update's: before any
  update the replayed log-probs must equal the rollout's.
  """
  if num_updates == 1:
    return train_step

  def step(state: TrainState, batch):
    new, metrics = jax.lax.scan(lambda s, _: train_step(s, batch), state,
                                None, length=num_updates)
    new = dataclasses.replace(new, step=state.step + 1)
    return new, {k: v[0] if k.endswith('replay_gap') else v[-1]
                 for k, v in metrics.items()}

  return step


def state_shardings(state: TrainState, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh) -> TrainState:
  """Shardings of a train state: parameters by the rules table, optimizer
  moments like their parameters, counters and the rng replicated."""
  specs = sharding_lib.partition_specs(state.params, mesh)
  params = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt = optax.tree_map_params(tx, lambda _, s: s, state.opt_state, params,
                              transform_non_params=lambda _: replicated)
  return TrainState(replicated, params, opt, replicated, replicated,
                    replicated)


def compile_train_step(train_step, state: TrainState,
                       tx: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh):
  """jit with explicit shardings and the state donated.

  The batch's micro-batch axis is replicated and its example axis split
  over ('data', 'fsdp').

  Returns:
    (jitted step, (state shardings, batch sharding)).
  """
  shardings = state_shardings(state, tx, mesh)
  batch_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, ('data', 'fsdp')))
  return jax.jit(train_step, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, None), donate_argnums=(0,)), (
                     shardings, batch_sharding)
