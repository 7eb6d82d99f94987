"""Launcher tests: dry runs only; gcloud, kubectl and sbatch never run."""

import os
import shlex
import subprocess
import sys

import pytest

from launch import common
from launch import gke
from launch import slurm
from launch import sweep
from launch import tpu

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
_MAIN = ['--config=configs/base.py:tiny', '--workdir=gs://bucket/run']
# An override whose value the shell would split: it must arrive quoted.
_OVERRIDE = '--config.prompt=a red circle'
# Kept before the fixture below replaces subprocess.run, for the one test
# that starts a launcher (never gcloud) as a subprocess.
_REAL_RUN = subprocess.run


@pytest.fixture(autouse=True)
def _no_subprocess(monkeypatch):
  """Any attempt to run a real command fails the test."""
  def refuse(*args, **kwargs):
    raise AssertionError(f'a launcher ran a command: {args} {kwargs}')
  monkeypatch.setattr(common.subprocess, 'run', refuse)


def _dry_run(main, argv, capsys):
  assert main([*argv, '--dry-run']) == 0
  return capsys.readouterr().out


def _exit_code_and_error(main, argv, capsys):
  with pytest.raises(SystemExit) as exc:
    main(argv)
  return exc.value.code, capsys.readouterr().err


def test_tpu_create(capsys):
  out = _dry_run(tpu.main, ['create', '--name=vm', '--zone=us-central2-b',
                            '--accelerator-type=v4-16'], capsys)
  assert out.strip() == (
      'gcloud compute tpus tpu-vm create vm --zone=us-central2-b '
      '--accelerator-type=v4-16 --version=tpu-ubuntu2204-base')


def test_tpu_copy_and_delete(capsys):
  out = _dry_run(tpu.main, ['copy', '--name=vm', '--zone=z', '--src=/repo'],
                 capsys)
  assert out.strip() == ('gcloud compute tpus tpu-vm scp --recurse /repo '
                         'vm:lvrpo_jax --zone=z --worker=all')
  out = _dry_run(tpu.main, ['delete', '--name=vm', '--zone=z'], capsys)
  assert out.strip() == 'gcloud compute tpus tpu-vm delete vm --zone=z --quiet'


def test_tpu_run_quotes_the_remote_command(capsys):
  out = _dry_run(tpu.main, ['run', '--name=vm', '--zone=z', *_MAIN,
                            _OVERRIDE], capsys)
  argv = shlex.split(out)
  assert argv[:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'vm',
                      '--zone=z', '--worker=all']
  remote = argv[8].removeprefix('--command=')
  assert remote.startswith('cd lvrpo_jax && python -m pip install -e . && ')
  # The remote shell splits the command back into the exact main argv.
  main_line = remote.split(' && ')[-1]
  assert shlex.split(main_line) == [
      'python', '-m', 'lvrpo_jax.main', *_MAIN, _OVERRIDE]
  assert "'--config.prompt=a red circle'" in main_line


@pytest.mark.parametrize('argv, missing', [
    (['create', '--zone=z'], ['--name', '--accelerator-type']),
    (['run', '--name=vm', '--zone=z'], ['--config', '--workdir']),
    (['delete', '--name=vm'], ['--zone']),
])
def test_tpu_missing_flags_exit_2(argv, missing, capsys):
  code, err = _exit_code_and_error(tpu.main, argv, capsys)
  assert code == 2
  for flag in missing:
    assert flag in err


def test_unknown_flag_is_an_error(capsys):
  code, err = _exit_code_and_error(
      slurm.main, ['--nodes=1', '--gpus-per-node=1', *_MAIN, '--bogus=1'],
      capsys)
  assert code == 2 and '--bogus=1' in err


def test_missing_flag_from_the_command_line():
  result = _REAL_RUN(
      [sys.executable, '-m', 'launch.tpu', 'create', '--name=vm', '--zone=z',
       '--dry-run'], cwd=_ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 2
  assert '--accelerator-type' in result.stderr


def test_gke_yaml(capsys):
  out = _dry_run(gke.main, ['--name=grpo', '--image=us-docker.pkg.dev/p/i:1',
                            '--num-hosts=4', '--tpu-type=tpu-v5p-slice',
                            '--tpu-topology=2x2x4', *_MAIN, _OVERRIDE], capsys)
  for line in ['kind: Service', 'kind: Job', 'completionMode: Indexed',
               'completions: 4', 'parallelism: 4', 'subdomain: grpo',
               'image: "us-docker.pkg.dev/p/i:1"',
               'cloud.google.com/gke-tpu-topology: "2x2x4"',
               'google.com/tpu: 4',
               'name: JAX_NUM_PROCESSES\n          value: "4"',
               'name: JAX_COORDINATOR_ADDRESS\n'
               '          value: "grpo-0.grpo:1234"',
               "batch.kubernetes.io/job-completion-index",
               'name: JAX_PROCESS_ID']:
    assert line in out
  assert ('"python -m lvrpo_jax.main --config=configs/base.py:tiny '
          "--workdir=gs://bucket/run '--config.prompt=a red circle'\"") in out


def test_gke_gpu_and_missing_flags(capsys):
  out = _dry_run(gke.main, ['--name=g', '--image=i', '--num-hosts=2',
                            '--accelerator=gpu', '--chips-per-host=8', *_MAIN],
                 capsys)
  assert 'nvidia.com/gpu: 8' in out and 'google.com/tpu' not in out
  code, err = _exit_code_and_error(gke.main, ['--name=g', *_MAIN], capsys)
  assert code == 2 and '--image' in err and '--num-hosts' in err


def test_slurm_script(capsys):
  out = _dry_run(slurm.main, ['--nodes=4', '--gpus-per-node=8',
                              '--partition=gpu', *_MAIN, _OVERRIDE], capsys)
  for line in ['#SBATCH --nodes=4', '#SBATCH --ntasks-per-node=1',
               '#SBATCH --gpus-per-node=8', '#SBATCH --partition=gpu',
               'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1',
               'export JAX_COORDINATOR_ADDRESS="${COORDINATOR}:12345"',
               'export JAX_NUM_PROCESSES="$SLURM_NTASKS"']:
    assert line in out
  srun = out.strip().splitlines()[-1]
  task = shlex.split(srun)
  assert task[:4] == ['srun', '--ntasks-per-node=1', 'bash', '-c']
  assert task[4] == (
      'export JAX_PROCESS_ID="$SLURM_PROCID" && exec python -m lvrpo_jax.main '
      "--config=configs/base.py:tiny --workdir=gs://bucket/run "
      "'--config.prompt=a red circle'")


def test_slurm_missing_flags_exit_2(capsys):
  code, err = _exit_code_and_error(slurm.main, ['--nodes=2', *_MAIN], capsys)
  assert code == 2 and '--gpus-per-node' in err


def test_sweep_expands_2x3_to_6_runs(capsys):
  out = _dry_run(sweep.main, [*_MAIN, '--sweep=rl.beta=0,0.01',
                              '--sweep=lr=1e-5,3e-5,1e-4', '--config.seed=7'],
                 capsys)
  runs = [shlex.split(line) for line in out.strip().splitlines()]
  assert len(runs) == 6
  workdirs = {a for run in runs for a in run if a.startswith('--workdir=')}
  assert len(workdirs) == 6
  assert runs[0] == [
      'python', '-m', 'lvrpo_jax.main', '--config=configs/base.py:tiny',
      '--workdir=gs://bucket/run/rl.beta=0,lr=1e-5', '--config.seed=7',
      '--config.rl.beta=0', '--config.lr=1e-5']
  assert runs[-1][-2:] == ['--config.rl.beta=0.01', '--config.lr=1e-4']


def test_sweep_through_launchers(capsys):
  out = _dry_run(sweep.main, ['--launcher=tpu', *_MAIN, '--sweep=a=1,2',
                              '--', 'run', '--name=vm', '--zone=z'], capsys)
  ssh = [l for l in out.splitlines() if l.startswith('gcloud')]
  assert len(ssh) == 2 and 'gs://bucket/run/a=2 --config.a=2' in ssh[1]
  out = _dry_run(sweep.main, ['--launcher=gke', *_MAIN, '--sweep=a=1,2,3',
                              '--', '--name=j', '--image=i', '--num-hosts=2'],
                 capsys)
  assert [f'name: j-{i}' in out for i in range(3)] == [True] * 3
  out = _dry_run(sweep.main, ['--launcher=slurm', *_MAIN, '--sweep=a=1,2',
                              '--', '--nodes=2', '--gpus-per-node=8'], capsys)
  assert out.count('#!/bin/bash') == 2


def test_sweep_bad_spec_exit_2(capsys):
  code, err = _exit_code_and_error(sweep.main, [*_MAIN, '--sweep=a'], capsys)
  assert code == 2 and '--sweep' in err
  code, err = _exit_code_and_error(sweep.main, _MAIN, capsys)
  assert code == 2 and '--sweep' in err
