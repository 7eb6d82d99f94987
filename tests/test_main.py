"""Tests of the entry point, lvrpo_jax/main.py, run as a subprocess."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from lvrpo_jax import configs
from lvrpo_jax import main

_ROOT = pathlib.Path(__file__).parents[1]


def _run(*args: str, code: str | None = None, pythonpath: str = '',
         drop_env: tuple[str, ...] = ()):
  """Runs `python -m lvrpo_jax.main ARGS` (or `python -c CODE ARGS`), with
  this environment less `drop_env`."""
  program = ['-c', code] if code else ['-m', 'lvrpo_jax.main']
  # The repository root is the working directory, so it is on sys.path.
  env = {k: v for k, v in os.environ.items() if k not in drop_env}
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (pythonpath, env.get('PYTHONPATH', '')) if p)
  return subprocess.run([sys.executable, *program, *args], cwd=_ROOT,
                        env=env, capture_output=True, text=True, timeout=60,
                        check=False)


@pytest.mark.parametrize('args, key, reason', [
    (['--config.world.nosuch=1'], 'world.nosuch', 'unknown key'),
    (['--config.world.nosuch.deeper=1'], 'world.nosuch', 'unknown key'),
    (['--config.world.image_size=abc'], 'world.image_size', "'abc'"),
    (['--config.world.image_size=48'], 'world.image_size',
     'must be one of 32, 64, 128, 256, got 48'),
    (['--config.stages=bogus'], 'stages', "unknown stage 'bogus'"),
    (["--config.world.heldout_pairs=('pink circle',)"],
     'world.heldout_pairs', "unknown colour 'pink'"),
    (['--config=configs/base.py:nope'], 'config', "unknown preset 'nope'"),
    (['--config=configs/nosuch.py'], 'config', 'No such file'),
    (['--config=configs/nosuch.py', '--config.seed=1'], 'config',
     'No such file'),
])
def test_config_error_is_one_line_and_exit_2(args, key, reason, tmp_path):
  result = _run(*args, f'--workdir={tmp_path}')
  assert result.returncode == 2, result.stderr
  assert result.stderr.count('\n') == 1, result.stderr
  assert result.stderr.startswith(f'config error: {key}: ')
  assert reason in result.stderr
  assert 'Traceback' not in result.stderr
  assert not result.stdout
  assert not list(tmp_path.iterdir())


def test_unknown_flag_is_one_line_and_exit_2():
  result = _run('--nosuch=1')
  assert result.returncode == 2
  assert result.stderr.startswith("flags error: Unknown command line flag")
  assert result.stderr.count('\n') == 1


_FAKE_STAGE = '''
import json, os

def run_world(config, workdir):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'world.json'), 'w') as f:
    json.dump({'image_size': config.world.image_size,
               'locked': config.is_locked}, f)

def run_eval(config, workdir):
  assert os.path.exists(os.path.join(workdir, 'world.json'))

def run_compile(config, workdir):
  import jax
  jax.jit(lambda x: x * 2 + 1)(jax.numpy.arange(3.0)).block_until_ready()
'''
_MAIN_WITH_FAKE_WORLD = textwrap.dedent('''
    from absl import app
    from lvrpo_jax import configs, main
    configs.STAGES['world'] = 'fake_stage:run_world'
    configs.STAGES['eval'] = 'fake_stage:run_eval'
    configs.STAGES['vae'] = 'fake_stage:run_compile'
    app.run(main.main, flags_parser=main._parse_flags)
''')


def test_stages_run_in_order_with_the_overridden_config(tmp_path):
  (tmp_path / 'fake_stage.py').write_text(_FAKE_STAGE)
  workdir = tmp_path / 'run'
  result = _run("--config.stages=('world', 'eval')",
                '--config.world.image_size=64', f'--workdir={workdir}',
                code=_MAIN_WITH_FAKE_WORLD, pythonpath=str(tmp_path))
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == (
      f'[stage world] start: fake_stage:run_world, workdir {workdir}')
  assert lines[1].startswith('[stage world] done in ')
  assert lines[2] == (
      f'[stage eval] start: fake_stage:run_eval, workdir {workdir}')
  assert lines[3].startswith('[stage eval] done in ')
  assert lines[4].startswith('[summary] ran: world (')
  assert ', eval (' in lines[4]
  written = (workdir / 'world.json').read_text()
  assert written == '{"image_size": 64, "locked": true}'


@pytest.mark.parametrize('setting', ['', 'off', 'elsewhere'])
def test_compiled_programs_persist_in_the_compile_cache(setting, tmp_path):
  (tmp_path / 'fake_stage.py').write_text(_FAKE_STAGE)
  workdir = tmp_path / 'run'
  result = _run('--config.stages=vae', f'--workdir={workdir}',
                f'--config.compile_cache_dir={tmp_path / setting}'
                if setting == 'elsewhere' else
                f'--config.compile_cache_dir={setting}',
                code=_MAIN_WITH_FAKE_WORLD, pythonpath=str(tmp_path),
                # The test session's own cache (conftest) would win.
                drop_env=('JAX_COMPILATION_CACHE_DIR',))
  assert result.returncode == 0, result.stderr
  cache = {'': workdir / 'xla_cache', 'off': None,
           'elsewhere': tmp_path / 'elsewhere'}[setting]
  # conftest sets JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0: every
  # program is written, however fast it compiled.
  if cache is None:
    assert not (workdir / 'xla_cache').exists()
  else:
    assert any(cache.iterdir())


def test_import_error_inside_a_stage_module_is_not_masked(
    monkeypatch, tmp_path):
  (tmp_path / 'broken_stage.py').write_text('import no_such_dependency\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(configs.STAGES, 'x', 'broken_stage:run')
  with pytest.raises(ModuleNotFoundError, match='no_such_dependency'):
    main._resolve('x')  # pylint: disable=protected-access


@pytest.mark.parametrize('config_arg, workdir', [
    ('configs/base.py', 'runs/default'),
    ('configs/base.py:world_preview', 'runs/world_preview'),
])
def test_default_workdir(config_arg, workdir):
  # pylint: disable-next=protected-access
  assert main._default_workdir(config_arg) == workdir
