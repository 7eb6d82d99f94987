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
