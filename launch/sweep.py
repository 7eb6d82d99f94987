"""Sweeps: the cartesian product of config overrides, one run per point.

  python -m launch.sweep --launcher=local \
      --config=configs/base.py:PRESET --workdir=/tmp/sweep \
      --sweep=lvrpo.kl_coef=0,0.01 --sweep=lvrpo.learning_rate=3e-5,1e-4 \
      [--config.KEY=VALUE ...] [--dry-run] [-- LAUNCHER ARGS ...]

Every point gets the overrides `--config.KEY=V` and its own workdir,
WORKDIR/KEY1=V1,KEY2=V2. `--launcher` picks what runs it: `local` runs the
points one after another here; `tpu`, `gke` and `slurm` hand each point to
that launcher (with --dry-run they print). Arguments after `--` go to the
launcher, e.g. `-- run --name=NAME --zone=ZONE` for tpu.
"""

import argparse
import itertools
import shlex
import sys

from launch import common
from launch import gke
from launch import slurm
from launch import tpu

_LAUNCHERS = {'tpu': tpu.main, 'gke': gke.main, 'slurm': slurm.main}
# Flags a launcher needs per point: GKE object names must be distinct.
_POINT_FLAGS = {'gke': lambda index: [f'--name-suffix=-{index}']}


def parse_sweep(text):
  """`KEY=V1,V2,...` -> (KEY, [V1, V2, ...]); a leading `config.` is dropped."""
  key, sep, values = text.partition('=')
  key = key.removeprefix('--').removeprefix('config.')
  if not sep or not key or not values:
    raise argparse.ArgumentTypeError(f'expected KEY=V1,V2,..., got {text!r}')
  return key, values.split(',')


def expand(workdir, sweeps):
  """The points of a sweep.

  Args:
    workdir: the sweep's base workdir.
    sweeps: a list of (KEY, [values]) pairs.

  Returns:
    A list of (workdir, overrides) pairs, one per point of the cartesian
    product, in row-major order (the last key varies fastest).
  """
  keys = [key for key, _ in sweeps]
  points = []
  for values in itertools.product(*(vals for _, vals in sweeps)):
    pairs = [f'{k}={v}' for k, v in zip(keys, values)]
    points.append((f'{workdir.rstrip("/")}/{",".join(pairs)}',
                   [f'{common.OVERRIDE_PREFIX}{p}' for p in pairs]))
  return points


def _run_local(args, index, workdir, overrides):
  del index  # local points run one after another; nothing to tell apart
  argv = common.main_argv(args.config, workdir, [*args.overrides, *overrides],
                          args.python)
  return common.execute(argv, args.dry_run)


def _run_launcher(args, index, workdir, overrides):
  point_flags = _POINT_FLAGS.get(args.launcher, lambda _: [])(index)
  argv = [*args.launcher_args, *point_flags, f'--config={args.config}',
          f'--workdir={workdir}', f'--python={args.python}',
          *args.overrides, *overrides, *(['--dry-run'] if args.dry_run else [])]
  if args.dry_run:
    print(f'# {args.launcher}: {shlex.join(overrides)}')
  return _LAUNCHERS[args.launcher](argv)


def _parser():
  parser = common.make_parser(__doc__.splitlines()[0])
  parser.add_argument('--launcher', choices=('local', *_LAUNCHERS),
                      default='local')
  parser.add_argument('--sweep', action='append', required=True,
                      type=parse_sweep, help='KEY=V1,V2,... (repeatable)')
  common.add_main_flags(parser)
  common.add_dry_run_flag(parser)
  return parser


def main(argv=None):
  """Parses argv (default: sys.argv[1:]), runs every point; returns code.

  Stops at the first point that fails and returns its exit status.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  split = argv.index('--') if '--' in argv else len(argv)
  parser = _parser()
  args = common.parse_with_overrides(parser, argv[:split])
  args.launcher_args = argv[split + 1:]
  keys = [key for key, _ in args.sweep]
  if len(set(keys)) != len(keys):
    parser.error(f'a key is swept twice: {keys}')
  run = _run_local if args.launcher == 'local' else _run_launcher
  for index, (workdir, overrides) in enumerate(
      expand(args.workdir, args.sweep)):
    code = run(args, index, workdir, overrides)
    if code:
      return code
  return 0


if __name__ == '__main__':
  sys.exit(main())
