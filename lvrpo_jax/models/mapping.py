"""Checkpoint-import machinery: reference state dicts -> our NNX modules.

The public import functions are in `convert.py`; this module is what they
share.

A mapping is a table of `Rule`s: a regular expression over the source names
(transformers / diffusers / BAGEL), the target parameter path in our module
(a format string filled with the expression's groups) and a transform
(`'T'`: transpose a Linear weight [out, in] -> our kernel [in, out]; `'conv'`:
a PyTorch conv weight [O, I, kh, kw] -> ours [kh, kw, I, O]; None: as is).
Adding a model family is adding a table.

`load(module, state_dict, rules)` checks the whole state dict before touching
the module: every source key must match a rule, every parameter of the module
must be filled, and every shape must agree; otherwise one ValueError lists
the missing, unexpected and mis-shaped keys. With a mesh, every parameter is
placed sharded as the logical-axis rules say (`sharding.partition_specs`),
one at a time and each device only receiving its shards, so a checkpoint
larger than one accelerator's memory loads onto a mesh; float32 copies are
made one parameter at a time too.
"""

import dataclasses
import re
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvrpo_jax import sharding

Transform = str | Callable[[np.ndarray], np.ndarray] | None

_TRANSFORMS = {
    None: lambda x: x,
    'T': lambda x: x.T,
    'conv': lambda x: x.transpose(2, 3, 1, 0),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """source regex (full match) -> target path format(s), with a transform.

  A tuple of targets copies one source tensor to several parameters (BAGEL
  initializes both experts of a layer from the same Qwen2 weights).
  """
  source: str
  target: str | tuple[str, ...]
  transform: Transform = None

  def apply(self, name: str, value: np.ndarray):
    """[(target path, array), ...] if `name` matches, else None."""
    match = re.fullmatch(self.source, name)
    if match is None:
      return None
    fn = _TRANSFORMS[self.transform] if isinstance(
        self.transform, str) or self.transform is None else self.transform
    array = fn(np.asarray(value))
    targets = (self.target,) if isinstance(self.target, str) else self.target
    return [(t.format(*match.groups()), array) for t in targets]


def reshape_or_keep(x: np.ndarray, shape) -> np.ndarray:
  """`x` reshaped, or unchanged when it does not fit `shape`: a mis-shaped
  source keeps its shape, so `map_state_dict` reports it with the others
  instead of numpy failing on the first one. For transforms."""
  try:
    return x.reshape(shape)
  except ValueError:
    return x


def param_paths(module: nnx.Module) -> dict[str, tuple[int, ...]]:
  """'a.b.0.kernel' -> shape of every nnx.Param of `module`."""
  flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
  return {'.'.join(str(p) for p in path): tuple(var.shape)
          for path, var in flat}


def map_state_dict(state_dict: Mapping[str, np.ndarray],
                   rules: Sequence[Rule],
                   expected: Mapping[str, tuple[int, ...]],
                   ignore: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """Maps source names to target paths and checks the result.

  Args:
    state_dict: source name -> array (numpy, or anything np.asarray takes).
    rules: the mapping table; the first matching rule wins.
    expected: target path -> shape, e.g. `param_paths(module)`.
    ignore: regexes of source keys to drop (buffers such as position ids).

  Returns:
    target path -> numpy array (the source's dtype), covering `expected`
    exactly.

  Raises:
    ValueError: listing missing, unexpected and mis-shaped keys.
  """
  out, unexpected, misshaped = {}, [], []
  for name, value in state_dict.items():
    if any(re.fullmatch(pattern, name) for pattern in ignore):
      continue
    mapped = next((m for m in (r.apply(name, value) for r in rules)
                   if m is not None), None)
    if mapped is None or any(path not in expected for path, _ in mapped):
      unexpected.append(name)
      continue
    for path, array in mapped:
      if tuple(array.shape) != expected[path]:
        misshaped.append(f'{name} -> {path}: {tuple(array.shape)} != '
                         f'{expected[path]}')
        continue
      out[path] = array
  missing = sorted(set(expected) - set(out) - {
      m.split(' -> ')[1].split(':')[0] for m in misshaped})
  problems = []
  if missing:
    problems.append(f'missing {missing}')
  if unexpected:
    problems.append(f'unexpected {sorted(unexpected)}')
  if misshaped:
    problems.append(f'mis-shaped {misshaped}')
  if problems:
    raise ValueError('state dict does not fit the model: ' +
                     '; '.join(problems))
  return out


def _per_layer(name: str, var) -> list[str] | None:
  """Per-layer paths of a stacked parameter (scan_layers: logical axis
  'layers' first), e.g. 'mot.layers.und.q.kernel' -> ['mot.layers.0.und.q.
  kernel', ...], the paths the tables name; None for any other."""
  names = var.get_metadata().get('out_sharding') or ()
  if tuple(names[:1]) != ('layers',) or 'layers.' not in name:
    return None
  head, tail = name.split('layers.', 1)
  return [f'{head}layers.{i}.{tail}' for i in range(var.shape[0])]


def load(module: nnx.Module, state_dict: Mapping[str, np.ndarray],
         rules: Sequence[Rule], ignore: Sequence[str] = (),
         mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
  """Fills `module`'s parameters from `state_dict` through `rules`; with a
  mesh, each parameter sharded over it by its logical axis names. Stacked
  layers (scan_layers) are filled from the per-layer names."""
  state = nnx.state(module, nnx.Param)
  expected, stacked = {}, {}
  for path, var in nnx.to_flat_state(state):
    name = '.'.join(str(p) for p in path)
    layers = _per_layer(name, var)
    if layers is None:
      expected[name] = tuple(var.shape)
    else:
      stacked[name] = layers
      expected.update({p: tuple(var.shape[1:]) for p in layers})
  arrays = map_state_dict(state_dict, rules, expected, ignore)
  specs = (dict(nnx.to_flat_state(sharding.partition_specs(state, mesh)))
           if mesh is not None else None)
  for path, var in nnx.to_flat_state(state):
    name = '.'.join(str(p) for p in path)
    array = (np.stack([arrays.pop(p) for p in stacked[name]])
             if name in stacked else arrays.pop(name))
    if mesh is None:
      var.set_value(jnp.asarray(array, dtype=var.dtype))
      continue
    spec = specs[path].get_value()
    var.set_value(jax.make_array_from_callback(
        tuple(var.shape), jax.sharding.NamedSharding(mesh, spec),
        lambda index, a=array: np.asarray(a[index], var.dtype)))
  nnx.update(module, state)
  return module
