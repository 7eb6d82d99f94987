"""Checkpoints of a training state and its Grain iterator, and preemption.

A thin wrapper around Orbax's CheckpointManager that every training stage
uses. A checkpoint of step k holds the state after k updates and the state
of the input iterator after the k batches those updates consumed, so
restoring it and going on is the run that never stopped:

    ckpt = checkpoint.Checkpointer(workdir / 'ckpt', save_every=500)
    if ckpt.latest_step() is None:
      state = init()                                # Born sharded.
    else:
      state, data_state = ckpt.restore(abstract_state)
      it.set_state(data_state)
    with checkpoint.sigterm_as_flag():
      for step in range(int(state['step']) + 1, num_steps + 1):
        state = train_step(state, next(it))         # Donates `state`.
        ckpt.save(step, state, it.get_state())      # Every save_every steps.
        if checkpoint.should_stop(step):
          ckpt.save(step, state, it.get_state(), force=True)
          ckpt.close()                              # Waits for the write.
          sys.exit(0)
    ckpt.save(num_steps, state, it.get_state(), force=True)
    ckpt.close()

`abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings (e.g.
`jax.eval_shape(init)` with the shardings of `init`'s out_shardings); the
restored arrays get exactly those shardings and dtypes, and pytree node types
(optax's NamedTuple states) come from it, not from the files.

Saves are atomic (Orbax writes `<step>.orbax-checkpoint-tmp` and renames it
when complete; a save killed halfway leaves only that, removed on the next
construction), asynchronous (`save` returns once the arrays are copied to
host, so donating them next step is safe; the files are written in the
background) and keep the newest `keep` steps. A newest checkpoint that does
not restore (a deleted or truncated file) is logged, renamed aside, and the
one before it is restored instead. Bit flips inside array data are not
detected: OCDBT stores no checksums.

Preemption: SIGTERM (a TPU VM's notice) sets a flag instead of killing the
process; `should_stop(step)` tells the loop to save and exit 0. Under
`jax.distributed` JAX's preemption service owns SIGTERM and picks one step
at which every process stops, so the collective save cannot deadlock.

The Grain state is written by the primary process only:
`data.pipeline.batches` iterators hold no shard in their state (every
process's state is the same after the same number of batches), so that one
copy restores every process.
"""

import contextlib
import signal
import threading
import time

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores (state, data_state) under one directory.

  `<directory>/<step>/state` holds the pytree of arrays (OCDBT),
  `<directory>/<step>/data_state` the JSON iterator state.
  """

  def __init__(self, directory, *, keep: int = 3, save_every: int,
               async_save: bool = True):
    """Opens `directory`; it is created by the first save, not here.

    Args:
      directory: a path (local, or any epath such as gs://).
      keep: how many of the newest checkpoints to keep, >= 1.
      save_every: `save` writes only steps that are multiples of this.
      async_save: write in a background thread.
    """
    for name, value in (('keep', keep), ('save_every', save_every)):
      if value < 1:
        raise ValueError(f'{name}={value} must be >= 1')
    self.directory = epath.Path(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(
                save_every),
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            # Restoring from a mistyped path must fail, not create it.
            create=False,
            # Leftovers of a save that was killed halfway.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        ))

  def save(self, step: int, state, data_state: dict | None = None,
           force: bool = False) -> bool:
    """Starts saving `state` and `data_state` as checkpoint `step`.

    Args:
      step: the number of updates applied to `state`.
      state: a pytree of jax arrays, e.g. {'params', 'opt_state', 'step',
        'rng'} (rng as `jax.random.key_data`, uint32).
      data_state: the JSON-serializable iterator state (`it.get_state()`).
      force: save even if `step` is not a multiple of `save_every`.

    Returns:
      Whether a save started: False for a step between intervals (unless
      `force`) and for a step already saved (a preemption save right after
      a regular one).
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    return self._manager.save(
        step, force=force,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_state=ocp.args.JsonSave(data_state)))

  def latest_step(self) -> int | None:
    """The newest step saved or found at construction; None if none."""
    return self._manager.latest_step()

  def restore(self, abstract_state, step: int | None = None):
    """Restores checkpoint `step`, by default the newest usable one.

    Args:
      abstract_state: the state's pytree of jax.ShapeDtypeStruct, each with a
        sharding; the restored arrays get its shardings, dtypes and pytree
        node types.
      step: a step to restore exactly (no fallback); None: the newest, or
        if that is damaged, the newest older one that restores (a warning
        names each damaged directory, which is then renamed
        `<step>.damaged-<time>` so that the resumed run can save it anew).

    Returns:
      (state, data_state).

    Raises:
      FileNotFoundError: naming the directory, if it is missing, or it or
        `step` holds no checkpoint.
      RuntimeError: naming the directory and each step's error, if no
        checkpoint in it restores (or naming `step`'s, if that does not).
      ValueError: if a leaf of `abstract_state` has no sharding.
    """
    _check_abstract(abstract_state)
    steps = self._steps()
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f'no checkpoint of step {step} in '
                                f'{self.directory}; it has steps {steps}')
      try:
        return self._restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        raise RuntimeError(f'checkpoint {self.directory / str(step)} does '
                           f'not restore: {_describe(e)}') from e
    errors = []
    for candidate in sorted(steps, reverse=True):
      try:
        restored = self._restore(candidate, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        # Damage surfaces as whatever the reader hit: tensorstore's
        # ValueError, a JSON error, a missing item's KeyError, ...
        error = _describe(e)
        logging.warning('checkpoint %s does not restore (%s); trying the '
                        'previous one', self.directory / str(candidate), error)
        errors.append((candidate, error, e))
        continue
      self._set_aside([s for s, _, _ in errors])
      return restored
    raise RuntimeError(
        f'no checkpoint in {self.directory} restores:\n' + '\n'.join(
            f'  {self.directory / str(s)}: {error}'
            for s, error, _ in errors)) from errors[-1][2]

  def wait(self):
    """Blocks until the background saves have finished."""
    self._manager.wait_until_finished()

  def close(self):
    """Waits for the saves and releases Orbax's threads."""
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def _steps(self) -> list[int]:
    """The steps on disk, after the saves in flight have landed."""
    self._manager.wait_until_finished()
    try:
      if not self.directory.is_dir():
        raise FileNotFoundError(
            f'no checkpoint directory {self.directory} (not created by a '
            'save, or not a directory)')
      self._manager.reload()
    except FileNotFoundError:
      raise
    except OSError as e:
      raise OSError(f'cannot read checkpoint directory {self.directory}: '
                    f'{e}') from e
    steps = list(self._manager.all_steps())
    if not steps:
      raise FileNotFoundError(f'no checkpoints in {self.directory}')
    return steps

  def _set_aside(self, steps: list[int]):
    """Renames the damaged `steps` to `<step>.damaged-<time>`.

    Orbax saves no step at or below its newest one, so a damaged newer step
    left in place would silently stop the saves of the resumed run until it
    passed that step. Renamed, not deleted: the files are evidence.
    """
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        path = self.directory / str(step)
        target = path.parent / f'{path.name}.damaged-{int(time.time())}'
        path.rename(target)
        logging.warning('moved damaged checkpoint %s to %s', path, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('lvrpo_jax.checkpoint._set_aside')
    self._manager.reload()

  def _restore(self, step: int, abstract_state):
    restored = self._manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_state=ocp.args.JsonRestore()))
    return restored.state, restored.data_state


def _describe(error: Exception) -> str:
  """The type and first line of `error`: tensorstore's run to pages."""
  first_line = (str(error).splitlines() or [''])[0]
  return f'{type(error).__name__}: {first_line[:300]}'


def _check_abstract(abstract_state):
  """Every leaf must carry a sharding: Orbax returns numpy arrays else."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  for path, leaf in leaves:
    if getattr(leaf, 'sharding', None) is None:
      raise ValueError(
          f'abstract_state{jax.tree_util.keystr(path)} has no sharding; '
          'pass jax.ShapeDtypeStruct(shape, dtype, sharding=...)')


_preempted = threading.Event()


def _on_sigterm(signum, frame):
  # Only sets the flag: a handler runs between two bytecodes of the main
  # thread, where logging or I/O could deadlock on a lock it holds.
  del signum, frame
  _preempted.set()


def install_sigterm_handler() -> bool:
  """Makes SIGTERM set the `preempted()` flag instead of ending the process.

  Call it from the main thread. Under `jax.distributed` it installs nothing:
  JAX's preemption service handles SIGTERM there (`should_stop` asks it),
  and a Python handler would take the signal away from it.

  Returns:
    Whether the handler was installed.
  """
  if jax.distributed.is_initialized():
    logging.info("SIGTERM is left to JAX's preemption service")
    return False
  _preempted.clear()
  signal.signal(signal.SIGTERM, _on_sigterm)
  return True


@contextlib.contextmanager
def sigterm_as_flag():
  """`install_sigterm_handler()` for a block; the old handler after it."""
  previous = signal.getsignal(signal.SIGTERM)
  installed = install_sigterm_handler()
  try:
    yield
  finally:
    if installed:
      # None: the old handler was not set from Python; the default is the
      # nearest we can restore.
      signal.signal(signal.SIGTERM,
                    signal.SIG_DFL if previous is None else previous)


def preempted() -> bool:
  """Whether this process has received SIGTERM since the handler went in."""
  return _preempted.is_set()


def should_stop(step: int) -> bool:
  """Whether the loop must save checkpoint `step` and exit now.

  Call it with the same `step` on every process, every step: under
  `jax.distributed` it is JAX's preemption sync point, true on all processes
  at the same step; otherwise it is `preempted()`.
  """
  if not jax.distributed.is_initialized():
    return preempted()
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:
    # jax_enable_preemption_service is off: no process can see a preemption
    # that all of them agree on, and stopping alone would hang the others.
    return False
