"""Multi-host training: 2 processes on localhost (jax.distributed over gloo)
train the same parameters as 1 process with the same global batch.

Both runs use 4 CPU devices in all (2 per process in the 2-process run), so
the only difference is the process split: each process reads its own shard
of the input stream and the global batch is assembled from process-local
data (`jax.make_array_from_process_local_data`).
"""

import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

_ROOT = pathlib.Path(__file__).parents[1]
_STEPS = 3
_SMOKE = ['--config=configs/base.py:pretrain_smoke',
          f'--config.pretrain.steps={_STEPS}']


def _env(devices: int, **extra: str) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env.update(extra)
  return env


def _main(workdir, *args: str, env: dict, preset=None) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, '-m', 'lvrpo_jax.main', f'--workdir={workdir}',
       *(preset or _SMOKE), *args], cwd=_ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, timeout: float = 300) -> str:
  try:
    out, _ = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    out, _ = process.communicate()
  assert process.returncode == 0, out
  return out


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _params(workdir, stage='pretrain', step=_STEPS) -> dict:
  path = (workdir / stage / 'checkpoints' / str(step) / 'state').resolve()
  checkpointer = ocp.StandardCheckpointer()
  # Onto this process's first device, whatever topology saved it.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      checkpointer.metadata(path).item_metadata.tree)
  state = checkpointer.restore(path, target)
  return jax.tree.map(np.asarray, state['params'])


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  # The world and the frozen vae once; then pretrain in one process.
  _finish(_main(one, '--config.stages=world', '--config.stages=vae',
                '--config.stages=pretrain', env=_env(4)))
  for stage in ('world', 'vae'):
    shutil.copytree(one / stage, two / stage)

  port = _free_port()
  workers = [
      _main(two, '--config.stages=pretrain', env=_env(
          2, JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
          JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i)))
      for i in range(2)]
  outputs = [_finish(w) for w in workers]
  assert 'jax.distributed: process 1' in outputs[1], outputs[1]

  want, got = _params(one), _params(two)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want),
                          jax.tree.leaves(got)):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  # The parameters moved: 3 updates are not a no-op.
  initial = _params_at_start(one)
  moved = max(float(np.abs(w - i).max()) for w, i in
              zip(jax.tree.leaves(want), jax.tree.leaves(initial)))
  assert moved > 1e-4, moved


# LVRPO on the smoke world: 4 prompts of each task per step (one per
# device), 2 steps after 3 of every earlier stage.
_LVRPO = ['--config=configs/base.py:smoke', '--config.vae.steps=3',
          '--config.reward_model.steps=3', '--config.pretrain.steps=3',
          '--config.lvrpo.steps=2', '--config.lvrpo.gen_batch_size=16',
          '--config.lvrpo.und_batch_size=16']


@pytest.mark.slow
def test_two_processes_run_lvrpo_like_one(tmp_path):
  """Each process scores its own samples; gathered, the rewards, the
  advantages and so the updates equal the one-process run's."""
  one, two = tmp_path / 'one', tmp_path / 'two'
  before = ['--config.stages=world', '--config.stages=vae',
            '--config.stages=reward_model', '--config.stages=pretrain']
  _finish(_main(one, *before, '--config.stages=lvrpo', env=_env(4),
                preset=_LVRPO))
  for stage in ('world', 'vae', 'reward_model', 'pretrain'):
    shutil.copytree(one / stage, two / stage)
  port = _free_port()
  workers = [
      _main(two, *before, '--config.stages=lvrpo', preset=_LVRPO, env=_env(
          2, JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
          JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i)))
      for i in range(2)]
  outputs = [_finish(w, timeout=600) for w in workers]
  assert 'lvrpo: complete at step 2' not in outputs[0], outputs[0]
  want = _params(one, 'lvrpo', 2)
  got = _params(two, 'lvrpo', 2)
  start = _params(one, 'pretrain', 3)
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want),
                          jax.tree.leaves(got)):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  moved = max(float(np.abs(w - s).max()) for w, s in
              zip(jax.tree.leaves(want), jax.tree.leaves(start)))
  assert moved > 1e-5, moved


def _params_at_start(workdir) -> dict:
  """The unified model's parameters as the pretrain stage initializes them."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from lvrpo_jax.models import presets  # pylint: disable=import-outside-toplevel
  from lvrpo_jax.models import unified  # pylint: disable=import-outside-toplevel
  del workdir
  ucfg, _ = presets.tiny()
  model = unified.UnifiedModel(ucfg, rngs=nnx.Rngs(0))
  return jax.tree.map(np.asarray,
                      nnx.to_pure_dict(nnx.state(model, nnx.Param)))
