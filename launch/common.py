"""Helpers shared by the launchers: the main command, flags, run-or-print."""

import argparse
import shlex
import subprocess
import sys

MAIN_MODULE = 'lvrpo_jax.main'
# Config overrides pass through to lvrpo_jax.main as `--config.KEY=VALUE`.
OVERRIDE_PREFIX = '--config.'


def make_parser(description):
  """Returns an ArgumentParser that never abbreviates long flags.

  Abbreviation is off so that `--config.KEY=VALUE` is never taken for a
  prefix of another flag.
  """
  return argparse.ArgumentParser(description=description, allow_abbrev=False)


def positive_int(text):
  """argparse type: an integer >= 1."""
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be >= 1, got {text}')
  return value


def add_main_flags(parser, required=True):
  """Adds the flags of the training command: --config, --workdir, --python."""
  parser.add_argument('--config', required=required,
                      help='config file[:preset], e.g. configs/base.py:tiny')
  parser.add_argument('--workdir', required=required,
                      help='run directory (gs://... for multi-host runs)')
  parser.add_argument('--python', default='python',
                      help='python interpreter on the target machines')


def add_dry_run_flag(parser):
  parser.add_argument('--dry-run', action='store_true',
                      help='print what would run instead of running it')


def parse_with_overrides(parser, argv):
  """Parses argv; unknown `--config.KEY=VALUE` flags become `args.overrides`.

  Any other unknown argument is an argparse error (exit 2).
  """
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest
         if not (a.startswith(OVERRIDE_PREFIX) and '=' in a)]
  if bad:
    parser.error(f'unrecognized arguments: {" ".join(bad)} '
                 f'(config overrides are written {OVERRIDE_PREFIX}KEY=VALUE)')
  args.overrides = rest
  return args


def main_argv(config, workdir, overrides=(), python='python'):
  """Returns the argv list of one training run."""
  return [python, '-m', MAIN_MODULE, f'--config={config}',
          f'--workdir={workdir}', *overrides]


def main_command(args):
  """Returns the training command of parsed `args` as one shell string.

  Every argument is shlex-quoted, so override values with spaces or shell
  characters reach lvrpo_jax.main unchanged.
  """
  return shlex.join(
      main_argv(args.config, args.workdir, args.overrides, args.python))


def execute(argv, dry_run, input_text=None):
  """Prints or runs one command.

  Args:
    argv: the command as a list of arguments.
    dry_run: print instead of run; with `input_text` the text is printed
      (it is the document the command would read), else the command.
    input_text: text fed to the command's stdin (a YAML or sbatch script).

  Returns:
    The command's exit status (0 for a dry run).
  """
  if dry_run:
    print(input_text if input_text is not None else shlex.join(argv))
    return 0
  print(f'+ {shlex.join(argv)}', file=sys.stderr)
  return subprocess.run(argv, input=input_text, text=True,
                        check=False).returncode
