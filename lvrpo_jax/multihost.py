"""Host-side work on global arrays, for one process or many.

The `lvrpo` stage scores its samples on the host (the world's detector,
tokenization, the frozen judges): every process scores the samples its own
devices hold, then every process gathers all the scores, so advantages and
metrics are computed identically everywhere. With one process each function
here is the plain numpy equivalent.

Arrays handled here are split over their leading axis only (rows), as the
rollout's sample arrays are.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils


def local_rows(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """(this process's rows of `x`, their global row indices), in row order.

  Raises:
    ValueError: if `x` is split over any axis but the first.
  """
  if x.is_fully_addressable:
    rows = np.asarray(x)
    return rows, np.arange(rows.shape[0])
  blocks = {}
  for shard in x.addressable_shards:
    if shard.data.shape[1:] != x.shape[1:]:
      raise ValueError(f'array {x.shape} is split over more than its rows '
                       f'(a shard is {shard.data.shape})')
    start, stop, _ = shard.index[0].indices(x.shape[0])
    blocks.setdefault(start, (stop, shard.data))  # Replicas: keep one.
  starts = sorted(blocks)
  return (np.concatenate([np.asarray(blocks[s][1]) for s in starts]),
          np.concatenate([np.arange(s, blocks[s][0]) for s in starts]))


def gather_rows(rows: np.ndarray, index: np.ndarray, total: int
                ) -> np.ndarray:
  """Every process's `rows` (at global `index`) as one [total, ...] array,
  the same on every process."""
  if jax.process_count() > 1:
    rows, index = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                   for x in (rows, index))
  out = np.empty((total,) + rows.shape[1:], rows.dtype)
  out[index] = rows
  return out


def sum_over_processes(value: float) -> float:
  """`value` summed over every process."""
  if jax.process_count() == 1:
    return float(value)
  return float(np.sum(multihost_utils.process_allgather(
      np.float64(value))))


def from_host(full: np.ndarray, sharding: jax.sharding.Sharding
              ) -> jax.Array:
  """A global array with `sharding` from the whole value, which every
  process holds (each places only its own devices' part)."""
  return jax.make_array_from_callback(full.shape, sharding,
                                      lambda index: full[index])


def local_copy(tree):
  """`tree` with every array usable by this process alone: arrays that span
  other processes' devices are gathered in full (their values are the same
  everywhere) onto this process's first device; others are unchanged."""
  device = jax.local_devices()[0]

  def local(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(
          np.asarray(multihost_utils.process_allgather(x, tiled=True)),
          device)
    return x

  return jax.tree.map(local, tree)
