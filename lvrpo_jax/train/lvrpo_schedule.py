"""What each step of the `lvrpo` stage trains: the tasks (answers, images,
or both), and of an image's `sample_steps` transitions the SDE ones and
those the reference pass and the update replay. `c` is config.lvrpo
throughout."""

import jax.numpy as jnp

from lvrpo_jax.rl import flow


def sde_transitions(c) -> int:
  """How many of an image's `sample_steps` transitions are SDE steps: the
  first `sde_window`, or all of them (`c` is config.lvrpo)."""
  return c.sde_window if 0 < c.sde_window < c.sample_steps else c.sample_steps


def sde_mask(c) -> tuple[bool, ...] | None:
  """The rollout's SDE steps ([T] bools, `flow.sde_rollout`), or None when
  all are."""
  k = sde_transitions(c)
  return None if k == c.sample_steps else tuple(
      i < k for i in range(c.sample_steps))


def trained_tasks(c, step: int) -> tuple[str, ...]:
  """The tasks ('und' answers, 'gen' images) the update at `step` (from 0)
  trains: both every step (the paper's joint GRPO), or with
  `und_first_steps` answers alone for that many steps, then images alone."""
  tasks = tuple(t for t, key in (('und', 'und_batch_size'),
                                 ('gen', 'gen_batch_size')) if c[key])
  if not c.und_first_steps:
    return tasks
  return ('und',) if step < c.und_first_steps else ('gen',)


def replays_subset(c) -> bool:
  """Whether the reference pass and the update replay a subset of each
  image's transitions: the SDE window's, or `train_transitions` of them."""
  k = sde_transitions(c)
  return k < c.sample_steps or 0 < c.train_transitions < k


def replayed_transitions(c, keys_n):
  """[N, K] int32: the transitions each image's reference pass and update
  replay (`rollout.select_transitions`): `train_transitions` of the SDE
  steps drawn per sample from keys_n [N] (`flow.transition_subsets`), or
  else every SDE step. The ODE steps after an `sde_window` have no
  log-prob to replay."""
  k = sde_transitions(c)
  if 0 < c.train_transitions < k:
    return flow.transition_subsets(keys_n, k, c.train_transitions)
  return jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32),
                          (keys_n.shape[0], k))
