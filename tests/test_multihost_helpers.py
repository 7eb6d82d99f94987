"""Host-side helpers on global arrays (lvrpo_jax/multihost.py), checked in
one process with 8 devices; tests/test_multihost.py runs two processes."""

import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lvrpo_jax import multihost
from lvrpo_jax import sharding


def _rows_sharding():
  mesh = sharding.make_mesh(4, 1, 2)  # Rows over 4 devices, 2 replicas.
  return NamedSharding(mesh, P(('data', 'fsdp')))


def test_local_rows_of_a_sharded_array_are_all_rows_in_order():
  full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  x = multihost.from_host(full, _rows_sharding())
  assert x.sharding.spec == P(('data', 'fsdp'))
  rows, index = multihost.local_rows(x)
  np.testing.assert_array_equal(rows, full)
  np.testing.assert_array_equal(index, np.arange(8))


def test_gather_rows_puts_rows_at_their_index():
  rows = np.array([[1.0], [2.0], [3.0]])
  out = multihost.gather_rows(rows, np.array([2, 0, 1]), 3)
  np.testing.assert_array_equal(out, [[2.0], [3.0], [1.0]])
  assert multihost.sum_over_processes(2.5) == 2.5


def test_local_copy_keeps_addressable_arrays():
  x = multihost.from_host(np.ones((8, 2), np.float32), _rows_sharding())
  tree = {'a': x, 'b': 3}
  assert multihost.local_copy(tree)['a'] is x

