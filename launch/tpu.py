"""Cloud TPU VM / pod launcher: create, copy, run, delete.

  python -m launch.tpu create --name=NAME --zone=ZONE \
      --accelerator-type=v5p-16 [--version=...] [--dry-run]
  python -m launch.tpu copy --name=NAME --zone=ZONE [--src=.] [--dry-run]
  python -m launch.tpu run --name=NAME --zone=ZONE \
      --config=configs/base.py:PRESET --workdir=gs://BUCKET/RUN \
      [--config.KEY=VALUE ...] [--dry-run]
  python -m launch.tpu delete --name=NAME --zone=ZONE [--dry-run]

`copy` and `run` address every worker of a pod (--worker=all); on a pod
`jax.distributed.initialize()` finds its peers itself, and the workdir must
be shared storage (gs://) that all workers write to.
"""

import shlex
import sys

from launch import common

_GCLOUD_TPU = ['gcloud', 'compute', 'tpus', 'tpu-vm']
_DEFAULT_VERSION = 'tpu-ubuntu2204-base'
_REPO_DIR = 'lvrpo_jax'  # on the workers, relative to the home directory


def _location(args):
  """The flags that place a TPU: zone and, when given, project."""
  flags = [f'--zone={args.zone}']
  if args.project:
    flags.append(f'--project={args.project}')
  return flags


def create_argv(args):
  argv = [*_GCLOUD_TPU, 'create', args.name, *_location(args),
          f'--accelerator-type={args.accelerator_type}',
          f'--version={args.version}']
  if args.spot:
    argv.append('--spot')
  return argv


def copy_argv(args):
  return [*_GCLOUD_TPU, 'scp', '--recurse', args.src,
          f'{args.name}:{args.repo_dir}', *_location(args), '--worker=all']


def remote_command(args):
  """The shell line every worker runs: install the repo, then train."""
  return (f'cd {shlex.quote(args.repo_dir)} && '
          f'{args.python} -m pip install -e . && {common.main_command(args)}')


def run_argv(args):
  return [*_GCLOUD_TPU, 'ssh', args.name, *_location(args), '--worker=all',
          f'--command={remote_command(args)}']


def delete_argv(args):
  return [*_GCLOUD_TPU, 'delete', args.name, *_location(args), '--quiet']


def _parser():
  parser = common.make_parser(__doc__.splitlines()[0])
  subs = parser.add_subparsers(dest='action', required=True)
  actions = {}
  for action, build in (('create', create_argv), ('copy', copy_argv),
                        ('run', run_argv), ('delete', delete_argv)):
    sub = subs.add_parser(action, allow_abbrev=False)
    sub.set_defaults(build=build)
    sub.add_argument('--name', required=True, help='TPU VM name')
    sub.add_argument('--zone', required=True, help='e.g. us-central2-b')
    sub.add_argument('--project', default=None, help='GCP project')
    common.add_dry_run_flag(sub)
    actions[action] = sub
  actions['create'].add_argument('--accelerator-type', required=True,
                                 help='e.g. v4-8, v5p-16')
  actions['create'].add_argument('--version', default=_DEFAULT_VERSION,
                                 help='TPU software version')
  actions['create'].add_argument('--spot', action='store_true')
  for action in ('copy', 'run'):
    actions[action].add_argument('--repo-dir', default=_REPO_DIR,
                                 help='repo folder on the workers')
  actions['copy'].add_argument('--src', default='.',
                               help='local repo folder to copy')
  common.add_main_flags(actions['run'])
  return parser


def main(argv=None):
  """Parses argv (default: sys.argv[1:]), prints or runs; returns exit code."""
  args = common.parse_with_overrides(_parser(), argv)
  if args.action != 'run' and args.overrides:
    _parser().error(f'config overrides apply only to run: {args.overrides}')
  return common.execute(args.build(args), args.dry_run)


if __name__ == '__main__':
  sys.exit(main())
