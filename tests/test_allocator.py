"""The training job's re-run under mimalloc: when it happens, and that it
does."""

import os
import subprocess
import sys

import pytest

from lvrpo_jax import allocator

_ROOT = os.path.dirname(os.path.dirname(__file__))
_LIB = '/site/cmeel.prefix/lib/libmimalloc.so'


def test_preloads_mimalloc_on_linux_with_a_purge_delay():
  env = allocator.preload_environment({'PATH': '/bin'}, 'linux', _LIB)
  assert env == {'PATH': '/bin', 'LD_PRELOAD': _LIB,
                 allocator.ENV: 'mimalloc', 'MIMALLOC_PURGE_DELAY': '1000'}
  # A delay the user chose stays.
  env = allocator.preload_environment({'MIMALLOC_PURGE_DELAY': '-1'},
                                      'linux', _LIB)
  assert env['MIMALLOC_PURGE_DELAY'] == '-1'


@pytest.mark.parametrize('environ, platform, library', [
    ({}, 'darwin', _LIB),                       # Not Linux.
    ({}, 'linux', None),                        # The wheel is missing.
    ({'LD_PRELOAD': 'libtcmalloc.so.4'}, 'linux', _LIB),  # Another choice.
    ({allocator.ENV: 'system'}, 'linux', _LIB),  # Opted out.
    ({allocator.ENV: 'mimalloc'}, 'linux', _LIB),  # Already the re-run.
])
def test_runs_as_is(environ, platform, library):
  assert allocator.preload_environment(environ, platform, library) is None


@pytest.mark.skipif(allocator.mimalloc_library() is None or
                    sys.platform != 'linux',
                    reason='cmeel-mimalloc is installed on Linux only')
@pytest.mark.parametrize('choice, loaded', [('', True), ('system', False)])
def test_the_command_runs_again_under_mimalloc(choice, loaded):
  code = ('import sys; from lvrpo_jax import allocator; allocator.reexec(); '
          "print(sys.argv[1:], 'libmimalloc' in open('/proc/self/maps')"
          '.read())')
  env = {k: v for k, v in os.environ.items()
         if k not in ('LD_PRELOAD', allocator.ENV)}
  if choice:
    env[allocator.ENV] = choice
  out = subprocess.run([sys.executable, '-c', code, 'a', '--b=1'], cwd=_ROOT,
                       env=env, capture_output=True, text=True, check=True,
                       timeout=60)
  # The arguments survive the re-run, which prints once.
  assert out.stdout == f"['a', '--b=1'] {loaded}\n"
