"""Checks the test session setup in conftest.py."""

import jax
import jax.numpy as jnp


def test_eight_fake_devices():
  assert jax.device_count() == 8


def test_persistent_compilation_cache_keeps_every_entry():
  assert jax.config.jax_compilation_cache_dir
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
  assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
  # A compile goes through the cache without error.
  assert int(jax.jit(lambda x: x + 1)(jnp.int32(1))) == 2


class _Item:
  """What the collection hook reads of a pytest item."""

  def __init__(self, marked):
    self.marked, self.added = marked, []

  def get_closest_marker(self, name):
    return object() if self.marked and name == 'mesh' else None

  def add_marker(self, marker):
    self.added.append(marker)


def test_mesh_tests_skip_where_fewer_devices_exist(monkeypatch):
  import importlib.util  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(__file__).with_name('conftest.py')
  spec = importlib.util.spec_from_file_location('conftest_copy', path)
  conftest = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(conftest)
  mesh, plain = _Item(True), _Item(False)
  conftest.pytest_collection_modifyitems(None, [mesh, plain])
  assert mesh.added == [] and plain.added == []  # 8 devices here.
  monkeypatch.setattr(conftest, 'MESH_DEVICES', 16)
  conftest.pytest_collection_modifyitems(None, [mesh, plain])
  (skip,) = mesh.added
  assert skip.name == 'skip' and plain.added == []
  assert skip.kwargs['reason'] == 'needs 16 devices, 8 cpu device(s) here'
