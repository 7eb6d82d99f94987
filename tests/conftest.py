"""Test session setup: 8 fake CPU devices and a persistent compile cache.

Everything is set in the environment before anything imports jax: XLA reads
XLA_FLAGS once, when its first backend starts, and jax reads its JAX_* config
variables at import. The environment also reaches the subprocesses that tests
start (e.g. `python -m lvrpo_jax.main`).
"""

import os
import re
import tempfile

# Sharding tests need a mesh of 8 devices; a CPU host fakes them. An inherited
# device count would break those tests, so it is replaced, not kept.
_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
_xla_flags = re.sub(rf'{_DEVICE_COUNT_FLAG}=\S*', '',
                    os.environ.get('XLA_FLAGS', ''))
# A run with an empty cache (below) is mostly compiling, and the tests'
# programs are small: LLVM's optimizations cost more than they save (2 cores,
# empty cache: 6 min 16 s with them, 4 min 14 s without). XLA:CPU's MLIR
# fusion emitters, too, compile slower than the classic ones (a micro model's
# forward pass op by op: 6.3 s against 4.1 s; a tiny one's jitted gradient:
# 3.2 s against 2.1 s; the same run time). Flags the environment already sets
# win.
for _flag, _value in (('--xla_backend_optimization_level', '0'),
                      ('--xla_llvm_disable_expensive_passes', 'true'),
                      ('--xla_cpu_use_fusion_emitters', 'false')):
  if _flag not in _xla_flags:
    _xla_flags = f'{_xla_flags} {_flag}={_value}'
os.environ['XLA_FLAGS'] = f'{_xla_flags.strip()} {_DEVICE_COUNT_FLAG}=8'.strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# Compiled programs persist across pytest runs, so a re-run of the suite skips
# most compiles. Every entry is kept: on 2 cores even a short compile costs
# more than reading it back. -1 also stops jax raising the size threshold.
os.environ.setdefault(
    'JAX_COMPILATION_CACHE_DIR',
    os.path.join(tempfile.gettempdir(), 'lvrpo_jax_jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')


import pytest  # pylint: disable=wrong-import-position

MESH_DEVICES = 8


def pytest_collection_modifyitems(config, items):
  """Skips the tests marked `mesh` where fewer than 8 devices exist.

  On a CPU host the flag above fakes them; an accelerator backend
  (`JAX_PLATFORMS=cuda`, as `benchmarks/gpu_check.sh` runs the tests) has as
  many devices as chips, and a 2 x 2 x 2 mesh cannot be built there.
  """
  del config  # Unused.
  marked = [item for item in items if item.get_closest_marker('mesh')]
  if not marked:
    return
  import jax  # pylint: disable=import-outside-toplevel
  if jax.device_count() >= MESH_DEVICES:
    return
  skip = pytest.mark.skip(
      reason=f'needs {MESH_DEVICES} devices, {jax.device_count()} '
      f'{jax.default_backend()} device(s) here')
  for item in marked:
    item.add_marker(skip)


@pytest.fixture
def compile_sharded():
  """(train_step, state, tx, mesh) -> (step, state): the step jitted as the
  loop does it (explicit shardings, donation) and asserted to trace once;
  the state placed on the mesh; the step takes host batches."""
  # Imported here: jax must not load before the environment above is set.
  import chex  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from lvrpo_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel

  def compile_(train_step, state, tx, mesh):
    step, (shardings, batch_sharding) = step_lib.compile_train_step(
        chex.assert_max_traces(train_step, n=1), state, tx, mesh)
    return ((lambda s, b: step(s, jax.device_put(b, batch_sharding))),
            jax.device_put(state, shardings))

  return compile_


@pytest.fixture
def base_config():
  """configs/base.py's get_config(arg=None), loaded by path as
  ml_collections' config flag does (configs/ is not a package)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(__file__).parents[1] / 'configs' / 'base.py'
  spec = importlib.util.spec_from_file_location('base_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config
