"""Tests of lvrpo_jax/checkpoint.py.

Run as a script, this file is also the toy training loop that the
preemption tests start as a subprocess:

    python tests/test_checkpoint.py WORKDIR STEPS [HANG_AT]

It fits a linear regression with adamw on the 2x2x2 mesh, Grain batches and
a noise key in the state, following the loop protocol of checkpoint.py, and
writes WORKDIR/final.npz at the end. With HANG_AT it stops making progress
after step HANG_AT (for a test to kill it).
"""

import gc
import os
import pathlib
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

from lvrpo_jax import checkpoint
from lvrpo_jax import sharding

_ROOT = pathlib.Path(__file__).parents[1]

# When one array of a damaged checkpoint fails to read, Orbax closes its
# event loop while the reads of the other arrays still finish (their
# callbacks raise 'Event loop is closed' where no one catches it) or have
# not started (their coroutines are never awaited). Both surface later, in
# whichever test the garbage collector happens to run: the tests that read
# damaged checkpoints collect garbage before they end, so it is one of these.
pytestmark = [
    pytest.mark.filterwarnings(
        'ignore::pytest.PytestUnraisableExceptionWarning'),
    pytest.mark.filterwarnings(
        'ignore:coroutine .* was never awaited:RuntimeWarning'),
]
_SAVE_EVERY = 4
_TMP_SUFFIX = '.orbax-checkpoint-tmp'  # Orbax's unfinished step directory.


def _toy_init():
  params = {'w': jnp.zeros((8, 4)), 'b': jnp.zeros((4,), jnp.bfloat16)}
  return {'params': params, 'opt_state': optax.adamw(1e-2).init(params),
          'step': jnp.int32(0),
          'rng': jax.random.key_data(jax.random.key(0))}


def _toy_shardings(mesh):
  """w on ('fsdp', 'tensor'), b on 'tensor' (the moments alike), else none."""
  specs = {(8, 4): P('fsdp', 'tensor'), (4,): P('tensor')}
  return jax.tree.map(
      lambda x: NamedSharding(mesh, specs.get(x.shape, P())),
      jax.eval_shape(_toy_init))


def _abstract(init, shardings):
  """jax.eval_shape(init) with `shardings`: what `restore` takes."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(init), shardings)


def _toy_batches():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8)).astype(np.float32)
  y = x @ rng.normal(size=(8, 4)).astype(np.float32)
  records = [{'x': x[i], 'y': y[i]} for i in range(len(x))]
  ds = grain.MapDataset.source(records).shuffle(seed=0).repeat().batch(8)
  # Read in the caller's thread: prefetching threads would make hundreds of
  # batches of this endless dataset ahead of time.
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))


def _toy_step(state, batch):
  key, noise_key = jax.random.split(jax.random.wrap_key_data(state['rng']))
  x = batch['x'] + 0.1 * jax.random.normal(noise_key, batch['x'].shape)

  def loss_fn(params):
    pred = x @ params['w'] + params['b']
    return jnp.mean((pred - batch['y']) ** 2)

  grads = jax.grad(loss_fn)(state['params'])
  updates, opt_state = optax.adamw(1e-2).update(
      grads, state['opt_state'], state['params'])
  return {'params': optax.apply_updates(state['params'], updates),
          'opt_state': opt_state, 'step': state['step'] + 1,
          'rng': jax.random.key_data(key)}


def _toy_main(workdir: pathlib.Path, num_steps: int, hang_at: int | None):
  """The loop protocol of checkpoint.py's docstring, on the toy problem."""
  mesh = sharding.make_mesh(2, 2, 2)
  shardings = _toy_shardings(mesh)
  batch_sharding = NamedSharding(mesh, P(('data', 'fsdp')))
  train_step = jax.jit(_toy_step, in_shardings=(shardings, batch_sharding),
                       out_shardings=shardings, donate_argnums=0)
  ckpt = checkpoint.Checkpointer(workdir / 'ckpt', keep=2,
                                 save_every=_SAVE_EVERY)
  it = _toy_batches()
  if ckpt.latest_step() is None:
    state = jax.jit(_toy_init, out_shardings=shardings)()
  else:
    state, data_state = ckpt.restore(_abstract(_toy_init, shardings))
    it.set_state(data_state)
  print(f'start {int(state["step"])}', flush=True)
  with checkpoint.sigterm_as_flag():
    for step in range(int(state['step']) + 1, num_steps + 1):
      state = train_step(state, next(it))
      ckpt.save(step, state, it.get_state())
      if step == hang_at:
        time.sleep(600)  # Killed by the test meanwhile.
      if checkpoint.should_stop(step):
        ckpt.save(step, state, it.get_state(), force=True)
        ckpt.close()
        print(f'preempted at {step}', flush=True)
        return
  ckpt.save(num_steps, state, it.get_state(), force=True)
  ckpt.close()
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  np.savez(workdir / 'final.npz',
           **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})


def _start_toy(workdir, num_steps, hang_at=None):
  env = dict(os.environ)  # conftest's 8 CPU devices and compile cache.
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (str(_ROOT), env.get('PYTHONPATH', '')) if p)
  args = [sys.executable, __file__, str(workdir), str(num_steps)]
  if hang_at is not None:
    args.append(str(hang_at))
  workdir.mkdir(parents=True, exist_ok=True)
  # stderr to a file: a full pipe, unread while the test polls, would stall
  # the loop. stdout carries a line or two.
  with open(workdir / 'stderr.log', 'a') as stderr:
    return subprocess.Popen(args, cwd=_ROOT, env=env, stderr=stderr,
                            stdout=subprocess.PIPE, text=True)


def _finish(proc, timeout=120):
  """(returncode, stdout, stderr) of `proc`, killed on timeout."""
  try:
    out, _ = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  workdir = pathlib.Path(proc.args[2])  # python, this file, workdir, ...
  return proc.returncode, out, (workdir / 'stderr.log').read_text()


def _wait_for(path: pathlib.Path, proc, timeout=60):
  deadline = time.monotonic() + timeout
  while not path.exists():
    if proc.poll() is not None:
      _, out, err = _finish(proc)
      pytest.fail(f'toy loop exited {proc.returncode} before {path} '
                  f'appeared:\n{out}\n{err[-3000:]}')
    if time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f'{path} did not appear in {timeout} s')
    time.sleep(0.05)


@pytest.fixture(name='mesh')
def fixture_mesh():
  return sharding.make_mesh(2, 2, 2)


def _state(mesh):
  shardings = _toy_shardings(mesh)
  state = jax.jit(_toy_init, out_shardings=shardings)()
  # Non-trivial values in every leaf, so the comparison means something.
  state = jax.jit(_toy_step, out_shardings=shardings)(
      state, {'x': jnp.ones((8, 8)), 'y': jnp.ones((8, 4))})
  return state, shardings


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    assert np.array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keeps_types_values_and_requested_shardings(mesh,
                                                               tmp_path):
  state, _ = _state(mesh)
  with checkpoint.Checkpointer(tmp_path / 'new' / 'ckpt',
                               save_every=1) as ckpt:
    assert ckpt.save(1, state, {'next_index': 8})
  # Restore with other shardings than those saved: they must be honoured.
  requested = jax.tree.map(
      lambda x: NamedSharding(mesh, P('data') if x.ndim else P()),
      jax.eval_shape(_toy_init))
  with checkpoint.Checkpointer(tmp_path / 'new' / 'ckpt',
                               save_every=1) as ckpt:
    assert ckpt.latest_step() == 1
    restored, data_state = ckpt.restore(_abstract(_toy_init, requested))
  assert data_state == {'next_index': 8}
  _assert_bitwise_equal(restored, state)
  assert isinstance(restored['opt_state'][0], optax.ScaleByAdamState)
  assert jax.tree.map(type, restored['opt_state']) == jax.tree.map(
      type, state['opt_state'])
  assert jax.tree.leaves(jax.tree.map(
      lambda x, s: x.sharding == s, restored, requested)) == [True] * len(
          jax.tree.leaves(state))
  assert restored['rng'].dtype == jnp.uint32


def test_save_every_keep_n_and_force(mesh, tmp_path):
  state, _ = _state(mesh)
  with checkpoint.Checkpointer(tmp_path, keep=2, save_every=2) as ckpt:
    saved = [ckpt.save(step, state) for step in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]
    assert ckpt.save(7, state, force=True)
    assert not ckpt.save(7, state, force=True)  # Already saved.
    ckpt.wait()
    assert ckpt.latest_step() == 7
  assert sorted(int(p.name) for p in tmp_path.iterdir()) == [6, 7]


def test_data_state_round_trip(mesh, tmp_path):
  state, shardings = _state(mesh)
  it = _toy_batches()
  next(it), next(it), next(it)
  with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, state, it.get_state())
    ckpt.save(2, state)
    _, data_state = ckpt.restore(_abstract(_toy_init, shardings), step=1)
    resumed = _toy_batches()
    resumed.set_state(data_state)
    np.testing.assert_array_equal(next(resumed)['x'], next(it)['x'])
    assert ckpt.restore(_abstract(_toy_init, shardings))[1] is None


def _truncate_data(step_dir: pathlib.Path):
  for path in (step_dir / 'state' / 'd').iterdir():
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _delete_manifest(step_dir: pathlib.Path):
  (step_dir / 'state' / 'manifest.ocdbt').unlink()


@pytest.mark.parametrize('damage', [_truncate_data, _delete_manifest])
def test_damaged_latest_falls_back_with_a_warning(damage, mesh, tmp_path,
                                                  caplog):
  state, shardings = _state(mesh)
  later = jax.tree.map(lambda x: x + 1, state)
  with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, state, {'next_index': 1})
    ckpt.save(2, later, {'next_index': 2})
  damage(tmp_path / '2')
  with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
    restored, data_state = ckpt.restore(_abstract(_toy_init, shardings))
    _assert_bitwise_equal(restored, state)
    assert data_state == {'next_index': 1}
    warnings = [r.getMessage() for r in caplog.records
                if r.levelname == 'WARNING' and 'does not restore' in
                r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f'checkpoint {tmp_path / "2"} does not restore' in warnings[0]
    # Set aside, so the resumed run saves step 2 again.
    assert ckpt.latest_step() == 1
    assert ckpt.save(2, later)
  assert sorted(p.name.split('-')[0] for p in tmp_path.iterdir()) == [
      '1', '2', '2.damaged']
  gc.collect()


def test_no_usable_checkpoint_names_the_directory(mesh, tmp_path):
  state, shardings = _state(mesh)
  with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, state)
  _delete_manifest(tmp_path / '1')
  with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
    with pytest.raises(RuntimeError, match=f'no checkpoint in {tmp_path} '):
      ckpt.restore(_abstract(_toy_init, shardings))
    with pytest.raises(RuntimeError, match=f'checkpoint {tmp_path / "1"} '):
      ckpt.restore(_abstract(_toy_init, shardings), step=1)
  gc.collect()


@pytest.mark.parametrize('subdir', ['', 'missing'])
def test_restore_without_checkpoints_names_the_path(subdir, mesh, tmp_path):
  path = tmp_path / subdir
  abstract = _abstract(_toy_init, _toy_shardings(mesh))
  with checkpoint.Checkpointer(path, save_every=1) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match=str(path)):
      ckpt.restore(abstract)
  assert path.exists() == (not subdir)  # Restoring creates nothing.


def test_restore_needs_shardings(tmp_path):
  with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
    with pytest.raises(ValueError,
                       match=r"\['opt_state'\]\[0\]\.count has no sharding"):
      ckpt.restore(jax.eval_shape(_toy_init))


def test_sigterm_sets_the_flag_in_its_block():
  before = signal.getsignal(signal.SIGTERM)
  with checkpoint.sigterm_as_flag():
    assert not checkpoint.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert checkpoint.preempted() and checkpoint.should_stop(1)
  assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_saves_and_exits_0(mesh, tmp_path):
  proc = _start_toy(tmp_path, 10**9)
  _wait_for(tmp_path / 'ckpt' / str(_SAVE_EVERY), proc)
  proc.send_signal(signal.SIGTERM)
  returncode, out, err = _finish(proc)
  assert returncode == 0, err[-3000:]
  stopped_at = int(out.split('preempted at ')[1])
  with checkpoint.Checkpointer(tmp_path / 'ckpt', save_every=1) as ckpt:
    assert ckpt.latest_step() == stopped_at
    state, data_state = ckpt.restore(_abstract(_toy_init,
                                               _toy_shardings(mesh)))
  assert int(state['step']) == stopped_at
  assert data_state == {'next_index': stopped_at}


def test_resume_after_kill_is_bitwise_exact(tmp_path):
  num_steps, half = 4 * _SAVE_EVERY, 2 * _SAVE_EVERY
  straight = _start_toy(tmp_path / 'straight', num_steps)
  killed = _start_toy(tmp_path / 'resumed', num_steps, hang_at=half)
  _wait_for(tmp_path / 'resumed' / 'ckpt' / str(half), killed)
  killed.send_signal(signal.SIGKILL)
  assert _finish(killed)[0] == -signal.SIGKILL
  # As if it had been killed in the middle of its next save, too.
  half_written = tmp_path / 'resumed' / 'ckpt' / f'{half + 1}{_TMP_SUFFIX}'
  half_written.mkdir()
  (half_written / 'state').write_bytes(b'')
  returncode, out, err = _finish(_start_toy(tmp_path / 'resumed', num_steps))
  assert returncode == 0, err[-3000:]
  assert out.startswith(f'start {half}\n')
  assert sorted(p.name for p in (tmp_path / 'resumed' / 'ckpt').iterdir()) == [
      str(num_steps - _SAVE_EVERY), str(num_steps)]
  assert _finish(straight)[0] == 0
  final = np.load(tmp_path / 'straight' / 'final.npz')
  resumed = np.load(tmp_path / 'resumed' / 'final.npz')
  assert sorted(final) == sorted(resumed)
  for key in final:
    assert np.array_equal(final[key], resumed[key]), key


if __name__ == '__main__':
  _toy_main(pathlib.Path(sys.argv[1]), int(sys.argv[2]),
            int(sys.argv[3]) if len(sys.argv) > 3 else None)
