r"""Runs the stages of a config in order: the LVRPO pipeline's entry point.

  python -m lvrpo_jax.main --config=configs/base.py[:preset] \
      [--workdir=DIR] [--config.KEY=VALUE ...]

Each stage is `fn(config, workdir) -> None`, named in `configs.STAGES` as
'module:function'; every stage the config names is imported before the first
one runs, so a broken stage fails the run before the stages ahead of it spend
their time. The work directory defaults to ./runs/<preset>.

A config error (an unknown key, a value of the wrong type or out of range, an
unknown stage, a config file that cannot be loaded) fails before any work with
one line on stderr, `config error: <key>: <reason>`, and exit status 2.

On Linux the job first runs itself again under mimalloc (`allocator.reexec`:
CPU training steps about 1.4x faster; LVRPO_JAX_ALLOCATOR=system opts out).
"""

import importlib
import os
import re
import sys
import time
from collections.abc import Callable
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lvrpo_jax import allocator
from lvrpo_jax import configs

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Work directory of the run; default ./runs/<preset>.')

_DEFAULT_CONFIG = 'configs/base.py'
# The override key in an absl flags error message, e.g. 'world.image_size'
# in "flag --config.world.image_size=abc: invalid literal ...".
_CONFIG_KEY_RE = re.compile(r'--config(?:\.([\w.]+))?(?![\w.])')


def _config_error(error: Exception) -> configs.ConfigError | None:
  """Returns the ConfigError that a --config parsing error stands for.

  Args:
    error: what absl flags or ml_collections raised while parsing flags.

  Returns:
    The ConfigError, or None when `error` is about another flag.
  """
  root = error
  while root.__context__ is not None:
    root = root.__context__
  if isinstance(error, OSError):
    # ml_collections defers a missing config file to the first access; its
    # message lists each path tried, ending with the OS error.
    last_line = str(root).strip().splitlines()[-1].strip()
    return configs.ConfigError('config', f'cannot load the file: {last_line}')
  match = _CONFIG_KEY_RE.search(str(error))
  if match is None:
    return None
  # A parser's ValueError (or the config file's own) is the reason; absl only
  # prefixes it with the flag and the raw argument.
  is_value_error = isinstance(error, flags.IllegalFlagValueError)
  reason = str(root) if is_value_error and root is not error else str(error)
  return configs.ConfigError(match.group(1) or 'config',
                             ' '.join(reason.split()))


def _override_through(error: LookupError | AttributeError,
                      argv: list[str]) -> str | None:
  """Returns the override key that walks through a missing config section.

  Args:
    error: ml_collections' KeyError or AttributeError for the section; its
      message quotes only the missing name, e.g. "'nosuch'".
    argv: the command line.

  Returns:
    The key up to the missing name, e.g. 'world.nosuch', or None when no
    override names it (then the error came from elsewhere).
  """
  quoted = re.search(r"'([^']+)'", str(error))
  if quoted is None:
    return None
  for arg in argv:
    override = re.match(r'--?(?:no)?config\.([\w.]+)', arg)
    parts = override.group(1).split('.') if override else []
    if quoted.group(1) in parts:
      return '.'.join(parts[:parts.index(quoted.group(1)) + 1])
  return None


def _fail(message: str) -> NoReturn:
  sys.stderr.write(message + '\n')
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """Parses flags, loads and validates the config; exits 2 on a bad config.

  Args:
    argv: the command line, program name first.

  Returns:
    The arguments left after the flags, program name first.
  """
  try:
    # Defined here rather than at import: the flag loads its default config,
    # with the overrides in sys.argv, the moment it is defined, and those
    # errors need the same one-line report. Unknown keys are accepted here
    # and rejected by `configs.validate` with the full key; the config is
    # locked after validation instead.
    config_flags.DEFINE_config_file(
        'config', default=_DEFAULT_CONFIG,
        help_string='Config file and preset: configs/base.py[:preset].',
        lock_config=False, accept_new_attributes=True)
    rest = flags.FLAGS(argv)
    config = flags.FLAGS.config
    configs.validate(config)
  except configs.ConfigError as e:
    _fail(str(e))
  except (KeyError, AttributeError) as e:
    key = _override_through(e, argv)
    if key is None:
      raise
    _fail(str(configs.ConfigError(key, 'unknown key')))
  except (flags.Error, OSError) as e:
    config_error = _config_error(e)
    _fail(str(config_error) if config_error
          else f'flags error: {" ".join(str(e).split())} (see --helpfull)')
  config.lock()
  return rest


def _default_workdir(config_arg: str) -> str:
  preset = config_arg.partition(':')[2]
  return os.path.join('runs', preset or 'default')


def _resolve(stage: str) -> tuple[Callable[..., None], str]:
  """Imports the function that runs `stage`: (fn, 'module:function')."""
  target = configs.STAGES[stage]
  module_name, fn_name = target.split(':')
  return getattr(importlib.import_module(module_name), fn_name), target


def _initialize_distributed() -> bool:
  """Starts jax.distributed on a multi-host run; returns whether it did.

  Multi-host means a coordinator in the environment (the GKE and Slurm
  launchers export JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID) or a Cloud TPU pod slice (TPU_WORKER_HOSTNAMES lists more
  than one host; JAX then finds everything itself).
  """
  import jax  # pylint: disable=g-import-not-at-top
  address = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if address:
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=int(os.environ['JAX_NUM_PROCESSES']),
        process_id=int(os.environ['JAX_PROCESS_ID']))
    return True
  if len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1:
    jax.distributed.initialize()
    return True
  return False


def _enable_compile_cache(setting: str, workdir: str) -> str | None:
  """Points JAX's persistent compilation cache at `setting` ('' means
  <workdir>/xla_cache; 'off' leaves it off); returns the directory, or None
  when off or when JAX_COMPILATION_CACHE_DIR (which JAX reads itself)
  already chose one."""
  if setting == 'off' or os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return None
  import jax  # pylint: disable=g-import-not-at-top
  path = setting or os.path.join(workdir, 'xla_cache')
  jax.config.update('jax_compilation_cache_dir', path)
  return path


def main(argv: list[str]) -> None:
  """Runs `config.stages` in order.

  Args:
    argv: the arguments left after the flags; only the program name.
  """
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Progress is printed; INFO logs (TFDS's among them) only with
    # --verbosity=0.
    logging.set_verbosity(logging.WARNING)
  if _initialize_distributed():
    logging.warning('jax.distributed: process %s', os.environ.get(
        'JAX_PROCESS_ID', 'auto'))
  config = flags.FLAGS.config
  workdir = _WORKDIR.value or _default_workdir(
      flags.FLAGS['config'].config_filename)
  logging.info('config:\n%s', config)
  logging.info('host allocator: %s', os.environ.get(allocator.ENV, 'system'))
  cache = _enable_compile_cache(config.compile_cache_dir, workdir)
  if cache:
    logging.info('compilation cache: %s', cache)
  # Import every stage first, so a broken stage module fails the run before
  # the stages ahead of it spend their time.
  plan = [(stage, *_resolve(stage)) for stage in config.stages]

  ran = []
  for stage, fn, note in plan:
    print(f'[stage {stage}] start: {note}, workdir {workdir}', flush=True)
    logging.info('stage %s: start', stage)
    start = time.perf_counter()
    try:
      fn(config, workdir)
    except FileNotFoundError as e:
      # A missing dataset, checkpoint or earlier stage: one line naming it.
      sys.stderr.write(f'[stage {stage}] error: {e}\n')
      sys.exit(1)
    except configs.ConfigError as e:
      # A value that only the devices can refute (e.g. a batch that does
      # not split over them), found before the stage compiles anything.
      sys.stderr.write(f'{e}\n')
      sys.exit(2)
    seconds = time.perf_counter() - start
    print(f'[stage {stage}] done in {seconds:.1f} s', flush=True)
    logging.info('stage %s: done in %.1f s', stage, seconds)
    ran.append(f'{stage} ({seconds:.1f} s)')

  print(f'[summary] ran: {", ".join(ran) or "none"}', flush=True)


if __name__ == '__main__':
  allocator.reexec()  # Before JAX starts: see lvrpo_jax/allocator.py.
  app.run(main, flags_parser=_parse_flags)
