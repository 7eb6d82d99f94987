"""Slurm launcher: an sbatch script for a multi-node GPU run.

  python -m launch.slurm --nodes=4 --gpus-per-node=8 \
      --config=configs/base.py:PRESET --workdir=/shared/runs/RUN \
      [--partition=P] [--time=24:00:00] [--config.KEY=VALUE ...] [--dry-run]

With --dry-run the script is printed; otherwise it is piped to `sbatch`.
One process per node sees all of that node's GPUs. The script exports what
`jax.distributed.initialize()` needs: the coordinator is the first node of
$SLURM_JOB_NODELIST, the process count $SLURM_NTASKS, and each task's
process id its $SLURM_PROCID.
"""

import shlex
import sys

from launch import common


def _sbatch_header(args):
  directives = [
      f'--job-name={args.job_name}',
      f'--nodes={args.nodes}',
      '--ntasks-per-node=1',
      f'--gpus-per-node={args.gpus_per_node}',
  ]
  for flag, value in (('partition', args.partition), ('time', args.time),
                      ('account', args.account), ('output', args.output)):
    if value:
      directives.append(f'--{flag}={value}')
  return [f'#SBATCH {d}' for d in directives]


def render(args):
  """Returns the sbatch script of parsed `args`."""
  # Single-quoted for the task's own shell, so $SLURM_PROCID is read per task.
  task = shlex.quote('export JAX_PROCESS_ID="$SLURM_PROCID" && exec '
                     + common.main_command(args))
  lines = [
      '#!/bin/bash',
      *_sbatch_header(args),
      'set -euo pipefail',
      *([f'cd {shlex.quote(args.repo_dir)}'] if args.repo_dir else []),
      '# jax.distributed.initialize(): coordinator = first node of the job.',
      'COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST"'
      ' | head -n 1)"',
      f'export JAX_COORDINATOR_ADDRESS="${{COORDINATOR}}:{args.port}"',
      'export JAX_NUM_PROCESSES="$SLURM_NTASKS"',
      f'srun --ntasks-per-node=1 bash -c {task}',
  ]
  return '\n'.join(lines) + '\n'


def _parser():
  parser = common.make_parser(__doc__.splitlines()[0])
  parser.add_argument('--nodes', required=True,
                      type=common.positive_int)
  parser.add_argument('--gpus-per-node', required=True,
                      type=common.positive_int)
  parser.add_argument('--job-name', default='lvrpo_jax')
  parser.add_argument('--partition', default=None)
  parser.add_argument('--time', default=None, help='e.g. 24:00:00')
  parser.add_argument('--account', default=None)
  parser.add_argument('--output', default=None, help='e.g. logs/%%j.out')
  parser.add_argument('--port', type=int, default=12345,
                      help='jax.distributed coordinator port')
  parser.add_argument('--repo-dir', default=None,
                      help='cd here first (default: the submit directory)')
  common.add_main_flags(parser)
  common.add_dry_run_flag(parser)
  return parser


def main(argv=None):
  """Parses argv (default: sys.argv[1:]), prints or submits; returns code."""
  args = common.parse_with_overrides(_parser(), argv)
  return common.execute(['sbatch'], args.dry_run, input_text=render(args))


if __name__ == '__main__':
  sys.exit(main())
