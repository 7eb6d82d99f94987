"""Sharding: the rules table, params born sharded, sharded == single-device.

The golden file lists the PartitionSpec of every parameter of the tiny
model. After an intended change, regenerate it and review the diff:

  python tests/test_sharding.py --update-golden
"""

import json
import pathlib
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvrpo_jax import sharding
from lvrpo_jax.models import presets
from lvrpo_jax.models import unified

_GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'partition_specs_tiny.json'
CFG, _ = presets.tiny()


def _make():
  return unified.UnifiedModel(CFG, rngs=nnx.Rngs(0))


def _specs() -> dict[str, str]:
  _, abstract = nnx.split(nnx.eval_shape(_make))
  specs = sharding.partition_specs(abstract)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  out = {}
  for path, spec in jax.tree_util.tree_leaves_with_path(specs,
                                                        is_leaf=is_spec):
    names = [str(getattr(k, 'key', getattr(k, 'idx', None))) for k in path
             if not isinstance(k, jax.tree_util.GetAttrKey)]  # .value
    out['.'.join(names)] = str(tuple(spec))
  return dict(sorted(out.items()))


def test_rules_table_is_small_and_maps_to_the_mesh():
  assert len(sharding.RULES) <= 12
  for _, axes in sharding.RULES:
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    assert set(axes) <= set(sharding.MESH_AXES)


def test_every_parameter_has_the_golden_partition_spec():
  assert _specs() == json.loads(_GOLDEN.read_text())


def test_unknown_logical_names_are_rejected():
  with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
    sharding.logical(nnx.initializers.zeros_init(), 'embed', 'hidden')
  with pytest.raises(ValueError, match='needs 12 devices'):
    sharding.make_mesh(3, 2, 2)


@pytest.fixture(scope='module')
def mesh():
  return sharding.make_mesh(2, 2, 2)


def test_params_are_born_sharded_and_equal_the_unsharded_init(mesh):
  model = sharding.init_sharded(_make, mesh)
  reference = _make()
  sharded = nnx.state(model, nnx.Param)
  for (path, got), want in zip(
      jax.tree_util.tree_leaves_with_path(sharded),
      jax.tree.leaves(nnx.state(reference, nnx.Param))):
    assert isinstance(got.sharding, jax.sharding.NamedSharding), path
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=str(path))
  kernel = model.mot.layers[0].und.gate.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  # Each device holds a quarter of it (fsdp 2 x tensor 2).
  shard = kernel.addressable_shards[0].data
  assert shard.size * 4 == kernel.size


def _batch(b=8):
  rng = np.random.default_rng(0)
  v = CFG.text.vocab_size
  return {
      'pixels': jnp.asarray(rng.uniform(-1, 1, (b, 32, 32, 3)), jnp.float32),
      'text': jnp.asarray(rng.integers(6, v, (b, 10)), jnp.int32),
      'prompt': jnp.asarray(rng.integers(6, v, (b, 8)), jnp.int32),
      'latents': jnp.asarray(rng.normal(size=(b, CFG.latent_size,
                                              CFG.latent_size,
                                              CFG.latent_channels)),
                             jnp.float32),
  }


def _loss(model, batch, rng):
  logits = model.understanding_logits(batch['pixels'], batch['text'])
  text_sum, text_n = unified.text_loss(logits[:, :-1], batch['text'][:, 1:],
                                       batch['text'][:, 1:] > 0)
  flow_sum, flow_n = unified.flow_loss(
      model, batch['prompt'], batch['latents'],
      jax.random.split(rng, batch['latents'].shape[0]))
  return text_sum / text_n + flow_sum / flow_n, logits


def test_sharded_forward_and_loss_equal_single_device(mesh):
  batch, rng = _batch(), jax.random.key(0)
  want_loss, want_logits = jax.jit(_loss)(_make(), batch, rng)
  model = sharding.init_sharded(_make, mesh)
  graphdef, state = nnx.split(model)
  data = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  batch = jax.device_put(batch, data)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def sharded(state, batch, rng):
    return _loss(nnx.merge(graphdef, state), batch, rng)

  for _ in range(2):
    got_loss, got_logits = sharded(state, batch, rng)
  assert got_logits.sharding.spec[0] == ('data', 'fsdp')
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=1e-5)


def test_scanned_layers_shard_like_the_unrolled_ones(mesh):
  # Stacked layers: the unrolled layer's spec with 'layers' (replicated)
  # in front; the sharded forward equals the single-device one.
  import dataclasses  # pylint: disable=g-import-not-at-top
  from lvrpo_jax.models import mot  # pylint: disable=g-import-not-at-top
  text = dataclasses.replace(presets.micro().text, scan_layers=True)
  make = lambda: mot.MoT(text, rngs=nnx.Rngs(0))
  model = sharding.init_sharded(make, mesh)
  kernel = model.layers.und.gate.kernel[...]
  assert kernel.shape[0] == text.num_layers
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp',
                                                            'tensor')
  tokens = jnp.asarray(np.random.default_rng(0).integers(
      6, text.vocab_size, (8, 12)), jnp.int32)
  want = jax.jit(lambda m, t: m.text_logits(t))(make(), tokens)
  got = jax.jit(lambda m, t: m.text_logits(t))(model, jax.device_put(
      tokens, jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


if __name__ == '__main__':
  if sys.argv[1:] == ['--update-golden']:
    _GOLDEN.write_text(json.dumps(_specs(), indent=0) + '\n')
    print(f'wrote {_GOLDEN}')
