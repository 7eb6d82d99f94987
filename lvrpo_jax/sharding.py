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
    ('layers', None),  # Stacked layers (scan_layers): each device has all.
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


def partition_specs(abstract_state, mesh: jax.sharding.Mesh | None = None):
  """PartitionSpec of every parameter, from its logical names via RULES.

  With a mesh, a dimension its mesh axes do not divide is replicated instead
  (e.g. the tiny world's 51-token vocabulary on tensor = 2); real
  checkpoints pad such dimensions, so they shard as the rules say.
  """
  with nnx.logical_axis_rules(RULES):
    specs = nnx.get_partition_spec(abstract_state)
  if mesh is None:
    return specs

  def divisible(spec, var):
    axes = []
    for dim, axis in zip(var.shape, tuple(spec) + (None,) * var.ndim):
      names = (axis,) if isinstance(axis, str) else (axis or ())
      size = int(np.prod([mesh.shape[n] for n in names]))
      axes.append(axis if dim % size == 0 else None)
    return jax.sharding.PartitionSpec(*axes)

  return jax.tree.map(divisible, specs, abstract_state)


def init_sharded(make_module, mesh: jax.sharding.Mesh):
  """Builds a module whose parameters are born sharded.

  `jax.eval_shape` gives shapes and logical names without allocating; the
  init then runs under `jax.jit` with `out_shardings`, so no device ever
  holds a whole parameter it does not own (big_vision's pattern).

  Args:
    make_module: () -> nnx.Module, deterministic (seeded rngs inside).
    mesh: the ('data', 'fsdp', 'tensor') mesh.

  Returns:
    The module, its state's arrays sharded over `mesh`.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(make_module))
  shardings = jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec),
                           partition_specs(abstract, mesh))
  init = jax.jit(lambda: nnx.split(make_module())[1], out_shardings=shardings)
  return nnx.merge(graphdef, init())
