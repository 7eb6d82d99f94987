"""mimalloc under the training job: XLA:CPU's step buffers without page faults.

XLA:CPU allocates a step's intermediate buffers afresh at every execution.
glibc's malloc serves them from per-thread arenas and unmaps a heap as soon
as it empties (M_TRIM_THRESHOLD and M_MMAP_MAX do not stop that), so each
step maps its working set again and takes a page fault per 4 KiB page.
Measured on 2 cores for the tiny model's pretrain step (batch 64,
`benchmarks/allocator.py`): 333 ms, 167 ms of it system CPU time, about
82,000 faults a step; with mimalloc keeping freed pages for a second
(`MIMALLOC_PURGE_DELAY=1000`, longer than a step) 231 ms and almost none
(tcmalloc: about the same; jemalloc's defaults: no change).

A malloc must be in place before the process starts, so `reexec()` runs the
command again, once, with the mimalloc of the `cmeel-mimalloc` wheel in
LD_PRELOAD. It does nothing off Linux, when LD_PRELOAD already names a
library (a TPU VM's tcmalloc, say), when the wheel is missing, or when
LVRPO_JAX_ALLOCATOR is set: 'system' keeps glibc's malloc, and the re-run
process finds 'mimalloc' there. Results do not depend on the allocator.
"""

import importlib.metadata
import os
import sys
from collections.abc import Mapping

ENV = 'LVRPO_JAX_ALLOCATOR'
# Milliseconds mimalloc keeps freed memory before returning it to the OS.
PURGE_DELAY_MS = '1000'


def mimalloc_library() -> str | None:
  """The path of the installed cmeel-mimalloc's libmimalloc.so, or None."""
  try:
    dist = importlib.metadata.distribution('cmeel-mimalloc')
  except importlib.metadata.PackageNotFoundError:
    return None
  for file in dist.files or ():
    if file.name.startswith('libmimalloc.so'):
      path = str(dist.locate_file(file))
      if os.path.isfile(path):
        return path
  return None


def preload_environment(environ: Mapping[str, str], platform: str,
                        library: str | None) -> dict[str, str] | None:
  """The environment to run the command again with, or None to go on.

  Args:
    environ: the current environment.
    platform: `sys.platform`.
    library: the mimalloc shared library, or None when not installed.
  """
  if (platform != 'linux' or library is None or environ.get(ENV)
      or environ.get('LD_PRELOAD')):
    return None
  return {**environ, 'LD_PRELOAD': library, ENV: 'mimalloc',
          'MIMALLOC_PURGE_DELAY': environ.get('MIMALLOC_PURGE_DELAY',
                                              PURGE_DELAY_MS)}


def reexec() -> None:
  """Replaces this process by the same command under mimalloc (same pid, so
  signals and launchers see no difference), or returns when it should not
  (see the module docstring). Call it first thing, before JAX starts."""
  environ = preload_environment(os.environ, sys.platform, mimalloc_library())
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
