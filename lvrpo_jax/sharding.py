"""The device mesh and the one logical-axis rules table.

Every parameter is created with logical axis names (one per dimension, from
`LOGICAL_AXES`); `RULES` maps each name to mesh axes of the one mesh
('data', 'fsdp', 'tensor'). Models never name mesh axes themselves, so a
different parallelism is a different rules table, not a different model.
"""

import jax
import numpy as np
from flax import nnx

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis -> mesh axes (None: replicated). At most 12 names.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ('batch', ('data', 'fsdp')),  # Activations' leading dimension.
    ('length', None),  # Sequence positions.
    ('embed', 'fsdp'),  # Model width: parameters are FSDP-sharded on it.
    ('mlp', 'tensor'),  # MLP hidden width: Megatron-style tensor parallel.
    ('heads', 'tensor'),  # Query heads.
    ('kv_heads', 'tensor'),  # Key/value heads (GQA).
    ('head_dim', None),
    ('vocab', 'tensor'),
    ('channels', None),  # Image / latent channels.
    ('conv', None),  # Convolution kernel taps and small vectors.
)
LOGICAL_AXES = tuple(name for name, _ in RULES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices=None) -> jax.sharding.Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all).

  `data=-1` takes whatever the other two axes leave.
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  if data == -1:
    if devices.size % (fsdp * tensor):
      raise ValueError(f'{devices.size} devices do not divide into '
                       f'fsdp={fsdp} x tensor={tensor}')
    data = devices.size // (fsdp * tensor)
  if data * fsdp * tensor != devices.size:
    raise ValueError(f'mesh {data}x{fsdp}x{tensor} needs '
                     f'{data * fsdp * tensor} devices, have {devices.size}')
  return jax.sharding.Mesh(devices.reshape(data, fsdp, tensor), MESH_AXES)


def logical(init, *names: str | None):
  """`init` whose parameter carries the logical axis `names`."""
  for name in names:
    if name is not None and name not in LOGICAL_AXES:
      raise ValueError(f'unknown logical axis {name!r}; known: '
                       f'{LOGICAL_AXES}')
  # Not sharded eagerly at creation: parameters are born sharded by jitting
  # their init with out_shardings derived from these names (`RULES`).
  return nnx.with_partitioning(init, names, eager_sharding=False)
