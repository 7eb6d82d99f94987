"""SigLIP vision tower, dual encoder, sigmoid loss and checkpoint import.

Models are built abstractly (`nnx.eval_shape`) and filled with host random
numbers: a jitted random init costs seconds of XLA compile on a CPU
(threefry per parameter), which these tests do not need.
"""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvrpo_jax import sharding
from lvrpo_jax.models import convert_siglip
from lvrpo_jax.models import mapping
from lvrpo_jax.models import dual_encoder as dual_lib
from lvrpo_jax.models import vit as vit_lib

# The parity models: vision width 32, text width 48 projected to 32.
_VISION = dict(image_size=32, patch_size=8, hidden_size=32,
               intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4)
_TEXT = dict(vocab_size=60, max_position_embeddings=16, hidden_size=48,
             intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             projection_size=32)


def _random(abstract: nnx.Module, seed: int = 0) -> nnx.Module:
  """`abstract` (from nnx.eval_shape) with N(0, 0.1^2) parameters."""
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(abstract)
  state = jax.tree.map(
      lambda x: jnp.asarray(rng.normal(0.0, 0.1, x.shape), x.dtype), state)
  return nnx.merge(graphdef, state)


def _abstract(cls, config):
  return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


@pytest.fixture(scope='module')
def encoder():
  return _random(_abstract(dual_lib.DualEncoder, dual_lib.tiny()))


@jax.jit
def _features(graphdef, state, pixels, ids):
  model = nnx.merge(graphdef, state)
  hidden = model.vision(pixels)
  image, text = model.embed_image(pixels), model.embed_text(ids)
  return dict(hidden=hidden, pooled=model.vision.pool(hidden),
              pooled_tokens=model.vision.pool_tokens(hidden),
              text_pooled=model.text.head(model.text(ids)[:, -1]),
              image=image, text=text, patches=model.image_patches(pixels),
              tokens=model.text_tokens(ids),
              loss=dual_lib.siglip_loss(image, text, model.logit_scale[...],
                                        model.logit_bias[...]))


def _pixels(b, size=32, seed=0):
  return np.random.default_rng(seed).uniform(
      -1, 1, (b, size, size, 3)).astype(np.float32)


def _ids(b, t, vocab, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (b, t)).astype(
      np.int32)


# ---------------------------------------------------------------- shapes


def test_shapes_and_unit_norms(encoder):
  out = _features(*nnx.split(encoder), _pixels(2), _ids(2, 12, 51))
  assert out['hidden'].shape == (2, 16, 64)
  assert out['pooled'].shape == (2, 64)
  assert out['pooled_tokens'].shape == (2, 16, 64)
  assert out['image'].shape == out['text'].shape == (2, 64)
  assert out['patches'].shape == (2, 16, 64)
  assert out['tokens'].shape == (2, 12, 64)
  for name in ('image', 'text', 'patches', 'tokens'):
    np.testing.assert_allclose(jnp.linalg.norm(out[name], axis=-1), 1.0,
                               rtol=1e-5)
  # The pooled text embedding is the token feature at the last position.
  np.testing.assert_allclose(out['tokens'][:, -1], out['text'], atol=1e-6)


def test_bfloat16_compute_gives_float32_unit_embeddings(encoder):
  half = _random(_abstract(dual_lib.DualEncoder, dual_lib.with_dtype(
      dual_lib.tiny(), 'bfloat16')))
  nnx.update(half, nnx.state(encoder))
  assert {x.dtype for x in jax.tree.leaves(nnx.state(half, nnx.Param))} == {
      jnp.dtype(jnp.float32)}
  full = _features(*nnx.split(encoder), _pixels(2), _ids(2, 12, 51))
  low = _features(*nnx.split(half), _pixels(2), _ids(2, 12, 51))
  assert low['hidden'].dtype == jnp.bfloat16
  for name in ('image', 'text', 'patches', 'tokens'):
    assert low[name].dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(low[name], axis=-1), 1.0,
                               rtol=1e-5)
    # Unit vectors: bf16 rounding of the towers moves them by ~1e-2.
    err = float(jnp.abs(low[name] - full[name]).max())
    assert 0 < err < 0.05, (name, err)


def test_patch_features_are_the_head_on_one_patch(encoder):
  """With N equal tokens the probe's attention is uniform over equal
  values, so the pooled output equals every per-token feature."""
  token = np.random.default_rng(1).normal(size=(2, 1, 64)).astype(np.float32)
  hidden = jnp.broadcast_to(token, (2, 16, 64))
  pooled, per_token = jax.jit(lambda g, s: (
      lambda vit: (vit.pool(hidden), vit.pool_tokens(hidden)))(
          nnx.merge(g, s)))(*nnx.split(encoder.vision))
  np.testing.assert_allclose(per_token, jnp.broadcast_to(
      pooled[:, None], per_token.shape), atol=1e-5)


def test_vit_without_head():
  config = vit_lib.ViTConfig(image_size=32, patch_size=8, width=32, depth=1,
                             heads=4, mlp_dim=64, use_head=False)
  model = _abstract(vit_lib.ViT, config)
  assert model.head is None
  assert not any(p.startswith('head.') for p in
                 mapping.param_paths(model))
  with pytest.raises(ValueError, match='no pooling head'):
    model.pool(jnp.zeros((1, 16, 32)))


def test_every_parameter_has_logical_axes():
  flat = nnx.to_flat_state(nnx.state(
      _abstract(dual_lib.DualEncoder, dual_lib.tiny()), nnx.Param))
  rules = dict(sharding.RULES)
  for path, var in flat:
    names = var.get_metadata().get('out_sharding')
    assert names is not None and len(names) == len(var.shape), path
    assert all(n is None or n in sharding.LOGICAL_AXES for n in names), path
    mesh_axes = [rules[n] for n in names if n is not None and rules[n]]
    assert len(mesh_axes) == len(set(mesh_axes)), (path, names)
  paths = {'.'.join(map(str, p)): v for p, v in flat}
  assert paths['vision.patch_embed.kernel'].get_metadata()['out_sharding'] == (
      'conv', 'conv', 'channels', 'embed')


def _param_count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_so400m_shapes_without_allocating():
  config = vit_lib.so400m_patch14(384)
  params = jax.eval_shape(
      lambda: nnx.state(vit_lib.ViT(config, rngs=nnx.Rngs(0)), nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves(params))
  d, f, p, n = 1152, 4304, 14, (384 // 14) ** 2  # 729 patches
  attention = 4 * (d * d + d)  # q, k, v, out with biases
  mlp = d * f + f + f * d + d
  block = attention + mlp + 2 * 2 * d  # + two LayerNorms
  head = d + attention + 2 * d + mlp  # probe, attention, LayerNorm, MLP
  by_hand = (p * p * 3 * d + d) + n * d + 27 * block + 2 * d + head
  assert by_hand == 428_225_600  # SigLIP-so400m/14-384's vision tower.
  assert _param_count(params) == by_hand


def test_so400m_dual_encoder_size():
  # At full depth the count is vision 428,225,600 + text 449,734,896 + 2
  # (~878 M, the google/siglip-so400m-patch14-384 checkpoint); tracing 54
  # blocks' init takes seconds (nnx draws each key through a traced
  # counter), so this checks everything but the depth at one block per
  # tower and leaves the block itself to the test above.
  config = dual_lib.so400m_patch14(384)
  assert (config.vision.depth, config.text.depth) == (27, 27)
  config = dual_lib.DualEncoderConfig(
      dataclasses.replace(config.vision, depth=1),
      dataclasses.replace(config.text, depth=1))
  params = jax.eval_shape(lambda: nnx.state(
      dual_lib.DualEncoder(config, rngs=nnx.Rngs(0)), nnx.Param))
  d, f = 1152, 4304
  block = 4 * (d * d + d) + (d * f + f + f * d + d) + 4 * d
  vision = 428_225_600 - 26 * block
  text = 32_000 * d + 64 * d + block + 2 * d + (d * d + d)
  assert text + 26 * block == 449_734_896
  assert _param_count(params) == vision + text + 2


# ---------------------------------------------------------------- inputs


@pytest.mark.parametrize('pixels, message', [
    (np.zeros((2, 28, 28, 3), np.float32), r'\[B, 32, 32, 3\]'),
    (np.zeros((2, 3, 32, 32), np.float32), 'NCHW'),
    (np.zeros((2, 32, 32, 3), np.uint8), 'floating point'),
    (np.zeros((32, 32, 3), np.float32), r'\[B, H, W, C\]'),
])
def test_bad_pixels(encoder, pixels, message):
  with pytest.raises(ValueError, match=message):
    encoder.embed_image(pixels)


@pytest.mark.parametrize('ids, message', [
    (np.zeros((2, 4), np.float32), 'integers'),
    (np.zeros((4,), np.int32), r'\[B, T\]'),
    (np.zeros((2, 17), np.int32), 'max_len=16'),
    (np.full((2, 4), 51, np.int32),
     r'\[51\] outside the vocabulary \[0, 51\)'),
])
def test_bad_ids(encoder, ids, message):
  with pytest.raises(ValueError, match=message):
    encoder.embed_text(ids)


def test_bad_pixels_fail_while_tracing(encoder):
  graphdef, state = nnx.split(encoder)
  with pytest.raises(ValueError, match='NCHW'):
    jax.jit(lambda s, x: nnx.merge(graphdef, s).embed_image(x))(
        state, np.zeros((1, 3, 32, 32), np.float32))


def test_bad_configs():
  with pytest.raises(ValueError, match='multiple of heads'):
    vit_lib.ViTConfig(image_size=32, patch_size=8, width=30, depth=1,
                      heads=4, mlp_dim=8)
  with pytest.raises(ValueError, match='projection_dim'):
    dual_lib.DualEncoderConfig(vit_lib.tiny(), dataclasses.replace(
        dual_lib.tiny().text, projection_dim=32))


def test_forward_traces_once(encoder):
  graphdef, state = nnx.split(encoder)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(graphdef, state, pixels):
    return nnx.merge(graphdef, state).embed_image(pixels)

  for seed in range(3):
    forward(graphdef, state, _pixels(2, seed=seed)).block_until_ready()


# ---------------------------------------------------------------- loss


def test_siglip_loss_by_hand():
  # x0 = (1, 0), x1 = (0.6, 0.8); y0 = (0.6, 0.8), y1 = (0, 1).
  # x.y = [[0.6, 0], [1.0, 0.8]]; t = exp(log 2) = 2, b = -1:
  # logits = 2 x.y - 1 = [[0.2, -1], [1, 0.6]].
  # z = [[1, -1], [-1, 1]] and -log sigmoid(u) = softplus(-u):
  # L = (softplus(-0.2) + softplus(-1) + softplus(1) + softplus(-0.6)) / 2
  #   = (0.598139 + 0.313262 + 1.313262 + 0.437488) / 2 = 1.331075.
  img = jnp.array([[1.0, 0.0], [0.6, 0.8]])
  txt = jnp.array([[0.6, 0.8], [0.0, 1.0]])
  loss = dual_lib.siglip_loss(img, txt, jnp.log(2.0), -1.0)
  np.testing.assert_allclose(loss, 1.3310751, rtol=1e-6)


def test_siglip_loss_matches_pairwise_formula():
  rng = np.random.default_rng(0)
  img = rng.normal(size=(3, 5))
  txt = rng.normal(size=(3, 5))
  scale, bias = 0.7, -2.0
  want = 0.0
  for i in range(3):
    for j in range(3):
      logit = math.exp(scale) * float(img[i] @ txt[j]) + bias
      z = 1.0 if i == j else -1.0
      want += math.log1p(math.exp(-z * logit))
  got = dual_lib.siglip_loss(jnp.asarray(img, jnp.float32),
                             jnp.asarray(txt, jnp.float32), scale, bias)
  np.testing.assert_allclose(got, want / 3, rtol=1e-5)


# ---------------------------------------------------------------- import


def _hf_vision_shapes(d=32, f=64, layers=2, p=8, n=16, c=3, head=True):
  """transformers SiglipVisionModel parameter names -> shapes."""
  shapes = {'embeddings.patch_embedding.weight': (d, c, p, p),
            'embeddings.patch_embedding.bias': (d,),
            'embeddings.position_embedding.weight': (n, d),
            'post_layernorm.weight': (d,), 'post_layernorm.bias': (d,)}

  def mlp(prefix):
    shapes.update({f'{prefix}fc1.weight': (f, d), f'{prefix}fc1.bias': (f,),
                   f'{prefix}fc2.weight': (d, f), f'{prefix}fc2.bias': (d,)})

  for i in range(layers):
    layer = f'encoder.layers.{i}.'
    for proj in ('q', 'k', 'v', 'out'):
      shapes[f'{layer}self_attn.{proj}_proj.weight'] = (d, d)
      shapes[f'{layer}self_attn.{proj}_proj.bias'] = (d,)
    for norm in ('layer_norm1', 'layer_norm2'):
      shapes[f'{layer}{norm}.weight'] = shapes[f'{layer}{norm}.bias'] = (d,)
    mlp(f'{layer}mlp.')
  if head:
    shapes.update({
        'head.probe': (1, 1, d), 'head.attention.in_proj_weight': (3 * d, d),
        'head.attention.in_proj_bias': (3 * d,),
        'head.attention.out_proj.weight': (d, d),
        'head.attention.out_proj.bias': (d,),
        'head.layernorm.weight': (d,), 'head.layernorm.bias': (d,)})
    mlp('head.mlp.')
  return shapes


def _random_state_dict(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_import_places_weights_with_or_without_prefix():
  state_dict = _random_state_dict(_hf_vision_shapes())
  for prefix in ('', 'vision_model.'):
    model = convert_siglip.vit_from_siglip(
        {prefix + k: v for k, v in state_dict.items()}, _VISION)
    np.testing.assert_array_equal(
        model.patch_embed.kernel[...],
        state_dict['embeddings.patch_embedding.weight'].transpose(2, 3, 1, 0))
    # q_proj [H E, D] -> [D, H, E]: head h is rows h E .. (h + 1) E.
    q = state_dict['encoder.layers.1.self_attn.q_proj.weight']
    np.testing.assert_array_equal(model.blocks[1].attn.query.kernel[:, 2],
                                  q[16:24].T)
    k = state_dict['head.attention.in_proj_weight'][32:64]
    np.testing.assert_array_equal(
        model.head.attn.key.kernel[...].reshape(32, 32), k.T)


def test_import_lists_every_problem():
  state_dict = _random_state_dict(_hf_vision_shapes())
  del state_dict['encoder.layers.1.mlp.fc2.bias']
  state_dict['encoder.layers.2.layer_norm1.weight'] = np.zeros(32)
  state_dict['embeddings.position_embedding.weight'] = np.zeros((15, 32))
  state_dict['encoder.layers.0.self_attn.q_proj.weight'] = np.zeros((33, 32))
  with pytest.raises(ValueError) as error:
    convert_siglip.vit_from_siglip(state_dict, _VISION)
  message = str(error.value)
  for part in ("missing ['blocks.1.mlp.fc2.bias']",
               "unexpected ['encoder.layers.2.layer_norm1.weight']",
               'embeddings.position_embedding.weight -> pos_embed',
               'encoder.layers.0.self_attn.q_proj.weight -> '
               'blocks.0.attn.query.kernel'):
    assert part in message, message


def test_import_rejects_unsupported_configs():
  with pytest.raises(ValueError, match='hidden_act'):
    convert_siglip.vit_config({**_VISION, 'hidden_act': 'relu'})
  with pytest.raises(ValueError, match='square'):
    convert_siglip.vit_config({**_VISION, 'image_size': [32, 48]})
  assert convert_siglip.vit_config({'vision_config': _VISION}) == (
      convert_siglip.vit_config(_VISION))


# ---------------------------------------------------------------- parity


def _torch_models():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)

  def perturbed(model):
    # transformers zero-initializes biases and the logit scalars; noise on
    # every parameter makes a mis-mapped bias visible.
    with torch.no_grad():
      for param in model.parameters():
        param.add_(0.1 * torch.randn_like(param))
    return model.eval()

  vision = perturbed(transformers.SiglipVisionModel(
      transformers.SiglipVisionConfig(**_VISION,
                                      attn_implementation='eager')))
  config = transformers.SiglipConfig(vision_config=_VISION,
                                     text_config=_TEXT)
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  return torch, vision, perturbed(transformers.SiglipModel(config))


def _numpy_state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _max_abs(ours, theirs) -> float:
  return float(np.max(np.abs(np.asarray(ours) - theirs.numpy())))


def test_parity_with_transformers():
  torch, vision, siglip = _torch_models()
  state_dict = _numpy_state_dict(vision)
  assert {k: tuple(v.shape) for k, v in state_dict.items()} == (
      _hf_vision_shapes())
  pixels, ids = _pixels(3), _ids(3, 12, _TEXT['vocab_size'])
  pixels_nchw = torch.from_numpy(pixels.transpose(0, 3, 1, 2))

  vit = convert_siglip.vit_from_siglip(state_dict, vision.config.to_dict())
  hidden, pooled = jax.jit(
      lambda g, s, x: (lambda m: (m(x), m.pool(m(x))))(nnx.merge(g, s)))(
          *nnx.split(vit), pixels)
  with torch.no_grad():
    want = vision(pixel_values=pixels_nchw)
  errors = {'last_hidden_state': _max_abs(hidden, want.last_hidden_state),
            'pooler_output': _max_abs(pooled, want.pooler_output)}

  encoder = convert_siglip.dual_encoder_from_siglip(
      _numpy_state_dict(siglip), siglip.config.to_dict())
  out = _features(*nnx.split(encoder), pixels, ids)
  with torch.no_grad():
    want = siglip(input_ids=torch.from_numpy(ids).long(),
                  pixel_values=pixels_nchw, return_loss=True)
  errors.update(
      image_embeds=_max_abs(out['image'], want.image_embeds),
      text_embeds=_max_abs(out['text'], want.text_embeds),
      vision_pooler=_max_abs(out['pooled'],
                             want.vision_model_output.pooler_output),
      text_pooler=_max_abs(out['text_pooled'],
                           want.text_model_output.pooler_output),
      loss=_max_abs(out['loss'], want.loss))
  print('parity max abs errors:', errors)
  assert max(errors.values()) < 1e-4, errors
