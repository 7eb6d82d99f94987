"""Tests of the latent autoencoders (models/vae.py) and their import.

The diffusers parity tests skip cleanly where torch or diffusers is missing;
everything else runs on numpy/jax alone.
"""

import functools
import importlib.util
import inspect
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lvrpo_jax.models import convert_vae
from lvrpo_jax.models import vae
from lvrpo_jax.world import examples
from lvrpo_jax.world import scene as scene_lib

# Small enough for a CPU, with every structural feature: two resolutions (one
# downsample / upsample), a width change (conv_shortcut), mid attention.
_TINY_KL = {
    'block_out_channels': (32, 64), 'layers_per_block': 1,
    'norm_num_groups': 8, 'latent_channels': 4, 'sample_size': 32,
    'down_block_types': ('DownEncoderBlock2D',) * 2,
    'up_block_types': ('UpDecoderBlock2D',) * 2,
}
# The FLUX.1 VAE's size, as counted from diffusers' AutoencoderKL built with
# the FLUX config (encoder 34,274,208 + decoder 49,545,475).
_FLUX_PARAMS = 83_819_683


def _diffusers_state_dict(config: dict) -> dict[str, np.ndarray]:
  """Zeros with diffusers' AutoencoderKL names and PyTorch shapes.

  Written from diffusers' module tree (Encoder/Decoder, DownEncoderBlock2D,
  UpDecoderBlock2D, UNetMidBlock2D, ResnetBlock2D, Attention); the parity
  test checks it against a real diffusers model.
  """
  cfg = vae.AutoencoderKLConfig.from_diffusers(config)
  sd = {}

  def param(name, weight_shape):
    sd[f'{name}.weight'] = np.zeros(weight_shape, np.float32)
    sd[f'{name}.bias'] = np.zeros(weight_shape[:1], np.float32)

  def resnet(name, cin, cout):
    param(f'{name}.norm1', (cin,))
    param(f'{name}.conv1', (cout, cin, 3, 3))
    param(f'{name}.norm2', (cout,))
    param(f'{name}.conv2', (cout, cout, 3, 3))
    if cin != cout:
      param(f'{name}.conv_shortcut', (cout, cin, 1, 1))

  def mid(name, ch):
    resnet(f'{name}.resnets.0', ch, ch)
    resnet(f'{name}.resnets.1', ch, ch)
    param(f'{name}.attentions.0.group_norm', (ch,))
    for proj in ('to_q', 'to_k', 'to_v', 'to_out.0'):
      param(f'{name}.attentions.0.{proj}', (ch, ch))

  chs, layers = cfg.block_out_channels, cfg.layers_per_block
  lat = cfg.latent_channels
  param('encoder.conv_in', (chs[0], cfg.in_channels, 3, 3))
  for i, ch in enumerate(chs):
    for j in range(layers):
      resnet(f'encoder.down_blocks.{i}.resnets.{j}',
             chs[max(i - 1, 0)] if j == 0 else ch, ch)
    if i < len(chs) - 1:
      param(f'encoder.down_blocks.{i}.downsamplers.0.conv', (ch, ch, 3, 3))
  mid('encoder.mid_block', chs[-1])
  param('encoder.conv_norm_out', (chs[-1],))
  param('encoder.conv_out', (2 * lat, chs[-1], 3, 3))
  rev = chs[::-1]
  param('decoder.conv_in', (rev[0], lat, 3, 3))
  mid('decoder.mid_block', rev[0])
  for i, ch in enumerate(rev):
    for j in range(layers + 1):
      resnet(f'decoder.up_blocks.{i}.resnets.{j}',
             rev[max(i - 1, 0)] if j == 0 else ch, ch)
    if i < len(rev) - 1:
      param(f'decoder.up_blocks.{i}.upsamplers.0.conv', (ch, ch, 3, 3))
  param('decoder.conv_norm_out', (chs[0],))
  param('decoder.conv_out', (cfg.out_channels, chs[0], 3, 3))
  if cfg.use_quant_conv:
    param('quant_conv', (2 * lat, 2 * lat, 1, 1))
  if cfg.use_post_quant_conv:
    param('post_quant_conv', (lat, lat, 1, 1))
  return sd


@pytest.fixture(scope='module')
def light_model() -> vae.LightAutoencoder:
  # Jitted init: one compile for all initializers. On 2 CPU cores each
  # random op compiles in ~1 s per new shape, so eager init costs more.
  return nnx.jit(lambda: vae.LightAutoencoder(vae.tiny(),
                                              rngs=nnx.Rngs(0)))()


def _abstract(model_cls, config):
  """(graphdef, abstract state): the model's structure, nothing computed."""
  return nnx.split(nnx.eval_shape(lambda: model_cls(config,
                                                    rngs=nnx.Rngs(0))))


def _shapes(model_cls, config, method: str, *args):
  """jax.eval_shape of `model.method(*args)` on an abstract model."""
  graphdef, state = _abstract(model_cls, config)
  return jax.eval_shape(
      lambda state, *a: getattr(nnx.merge(graphdef, state), method)(*a),
      state, *args)


def _num_params(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _world_pixels(n: int) -> jax.Array:
  """n training images of the shapes world as [n, 32, 32, 3] in [-1, 1]."""
  world = examples.WorldSpec()
  images = [scene_lib.render(examples.make_example(world, 'train', i).scene)
            for i in range(n)]
  return vae.from_uint8(np.stack(images))


@pytest.mark.parametrize('use_quant_conv', [True, False])
def test_autoencoder_kl_matches_diffusers(use_quant_conv):
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  torch.manual_seed(0)
  config = {**_TINY_KL, 'use_quant_conv': use_quant_conv,
            'use_post_quant_conv': use_quant_conv}
  ref = diffusers.AutoencoderKL(**config).eval().float()
  # Random init leaves GroupNorm affine at (1, 0): perturb every parameter
  # so a swapped scale/bias or a missed transpose cannot hide.
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  state_dict = ref.state_dict()
  # Our hand-written naming helper (used below without torch) is right.
  assert {k: tuple(v.shape) for k, v in state_dict.items()} == {
      k: v.shape for k, v in _diffusers_state_dict(dict(ref.config)).items()}
  model = convert_vae.vae_from_diffusers(state_dict, ref.config)

  rng = np.random.default_rng(0)
  # Non-square, to catch a swapped H/W or the asymmetric downsample padding.
  pixels = rng.uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
  latents = rng.normal(size=(2, 8, 12, 4)).astype(np.float32)
  with torch.no_grad():
    dist = ref.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2)
                      ).latent_dist
    decoded = ref.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)
                         ).sample
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  mean, logvar = jax.jit(lambda m, x: m.encode(x))(model, pixels)
  pixels_out = jax.jit(lambda m, z: m.decode(z))(model, latents)
  errors = {'mean': np.abs(mean - nhwc(dist.mean)).max(),
            'logvar': np.abs(logvar - nhwc(dist.logvar)).max(),
            'decode': np.abs(pixels_out - nhwc(decoded)).max()}
  print(f'max abs error vs diffusers (quant={use_quant_conv}): {errors}')
  for name, err in errors.items():
    assert err < 1e-4, (name, err)

  # Pre-0.14 attention names load into the same parameters.
  old = {k.replace('to_q', 'query').replace('to_k', 'key')
          .replace('to_v', 'value').replace('to_out.0', 'proj_attn'): v
         for k, v in state_dict.items()}
  chex.assert_trees_all_equal(
      nnx.state(convert_vae.vae_from_diffusers(old, ref.config)),
      nnx.state(model))


def _bagel_module(relative: str):
  """A module of the BAGEL checkout at LVRPO_BAGEL_SRC, loaded by path (its
  package __init__ imports the whole model); skips without one."""
  src = os.environ.get('LVRPO_BAGEL_SRC')
  if not src:
    pytest.skip('LVRPO_BAGEL_SRC (a BAGEL checkout) is not set')
  spec = importlib.util.spec_from_file_location(
      'bagel_' + relative.replace('/', '_'), os.path.join(src, relative))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_flux_autoencoder_matches_bfl_code():
  # FLUX's autoencoder as black-forest-labs wrote it (BAGEL ships it as
  # modeling/autoencoder.py): the LDM names of `ae.safetensors`.
  torch = pytest.importorskip('torch')
  pytest.importorskip('einops')
  ae_lib = _bagel_module('modeling/autoencoder.py')
  params = dict(resolution=32, in_channels=3, downsample=2, ch=32, out_ch=3,
                ch_mult=[1, 2], num_res_blocks=1, z_channels=4,
                scale_factor=0.3611, shift_factor=0.1159)
  torch.manual_seed(0)
  ref = ae_lib.AutoEncoder(ae_lib.AutoEncoderParams(**params)).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model = convert_vae.vae_from_flux(ref.state_dict(), params)
  assert (model.config.scaling_factor, model.config.shift_factor) == (
      0.3611, 0.1159)

  rng = np.random.default_rng(0)
  pixels = rng.uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
  latents = rng.normal(size=(2, 16, 24, 4)).astype(np.float32)
  nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  with torch.no_grad():
    want_mean, want_logvar = torch.chunk(ref.encoder(nchw(pixels)), 2, dim=1)
    want_pixels = ref.decoder(nchw(latents))
  mean, logvar = model.encode(jnp.asarray(pixels))
  np.testing.assert_allclose(mean, nhwc(want_mean), atol=1e-4, rtol=0)
  np.testing.assert_allclose(logvar, nhwc(want_logvar), atol=1e-4, rtol=0)
  np.testing.assert_allclose(model.decode(jnp.asarray(latents)),
                             nhwc(want_pixels), atol=1e-4, rtol=0)
  bad = dict(ref.state_dict())
  del bad['decoder.up.0.block.1.conv2.weight']
  with pytest.raises(ValueError, match=r'missing.*up_blocks\.1\.resnets'):
    convert_vae.vae_from_flux(bad, params)
  with pytest.raises(ValueError, match='downsample'):
    convert_vae.vae_from_flux(ref.state_dict(), {**params, 'downsample': 8})


def test_light_autoencoder_shapes():
  # Shapes only: the training test below runs the model.
  shapes = functools.partial(_shapes, vae.LightAutoencoder, vae.tiny())
  pixels = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  mean, logvar = shapes('encode', pixels)
  assert mean.shape == logvar.shape == (2, 4, 4, 8)
  assert shapes('decode', mean).shape == (2, 32, 32, 3)
  # Resolution-agnostic: 64x64 -> 8x8 latents.
  assert shapes('encode', jax.ShapeDtypeStruct(
      (1, 64, 64, 3), jnp.float32))[0].shape == (1, 8, 8, 8)
  model = nnx.eval_shape(lambda: vae.LightAutoencoder(vae.tiny(),
                                                      rngs=nnx.Rngs(0)))
  assert model.latent_shape(32) == (4, 4, 8)
  assert model.latent_shape((32, 64)) == (4, 8, 8)


def test_one_interface():
  kl_config = vae.AutoencoderKLConfig.from_diffusers(_TINY_KL)
  for name in ('encode', 'decode', 'latent_shape', 'normalize_latents',
               'denormalize_latents'):
    assert (inspect.signature(getattr(vae.LightAutoencoder, name)) ==
            inspect.signature(getattr(vae.AutoencoderKL, name))), name
  shapes = functools.partial(_shapes, vae.AutoencoderKL, kl_config)
  mean, logvar = shapes('encode',
                        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert mean.shape == logvar.shape == (1, 16, 16, 4)
  assert shapes('decode', mean).shape == (1, 32, 32, 3)
  kl = nnx.eval_shape(lambda: vae.AutoencoderKL(kl_config, rngs=nnx.Rngs(0)))
  assert kl.latent_shape(32) == (16, 16, 4)
  z = jnp.linspace(-2, 2, 8)
  np.testing.assert_allclose(
      kl.denormalize_latents(kl.normalize_latents(z)), z, rtol=1e-6)
  np.testing.assert_allclose(kl.normalize_latents(z), (z - 0.0) * 0.18215,
                             rtol=1e-6)


def test_light_autoencoder_learns_world_images(light_model):
  pixels = _world_pixels(8)
  graphdef, params = nnx.split(light_model)
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(params)

  def loss_fn(params):
    autoencoder = nnx.merge(graphdef, params)
    mean, _ = autoencoder.encode(pixels)
    return jnp.mean((autoencoder.decode(mean) - pixels) ** 2)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(30):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  print(f'light autoencoder MSE: {losses[0]:.4f} -> {losses[-1]:.4f}')
  assert losses[-1] < 0.5 * losses[0], losses


def test_bad_inputs_raise_before_compile(light_model):
  model = light_model
  encode = jax.jit(lambda m, x: m.encode(x))
  cases = [
      (jnp.zeros((32, 32, 3)), 'rank 3'),
      (jnp.zeros((1, 32, 32, 3), jnp.uint8), 'from_uint8'),
      (jnp.zeros((1, 32, 32, 4)), '3 channels'),
      (jnp.zeros((1, 3, 32, 32)), '3 channels'),  # NCHW by mistake.
      (jnp.zeros((1, 36, 32, 3)), 'multiples of 8'),
  ]
  for pixels, message in cases:
    with pytest.raises(ValueError, match=message):
      model.encode(pixels)
    with pytest.raises(ValueError, match=message):
      encode(model, pixels)  # Raised while tracing: nothing compiles.
  with pytest.raises(ValueError, match='8 channels'):
    model.decode(jnp.zeros((1, 4, 4, 4)))
  with pytest.raises(ValueError, match='rank 2'):
    model.decode(jnp.zeros((4, 8)))
  with pytest.raises(ValueError, match='multiple'):
    model.latent_shape(30)
  with pytest.raises(ValueError, match='act_fn'):
    vae.AutoencoderKLConfig.from_diffusers({**_TINY_KL, 'act_fn': 'relu'})
  with pytest.raises(ValueError, match='unknown AutoencoderKL config keys'):
    vae.AutoencoderKLConfig.from_diffusers({**_TINY_KL, 'typo': 1})
  with pytest.raises(ValueError, match='norm_num_groups'):
    vae.AutoencoderKLConfig.from_diffusers(
        {**_TINY_KL, 'norm_num_groups': 24})


def test_to_uint8():
  pixels = jnp.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0])
  np.testing.assert_array_equal(vae.to_uint8(pixels),
                                [0, 0, 128, 255, 255, 255])
  images = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(vae.to_uint8(vae.from_uint8(images)), images)


@pytest.mark.parametrize('config_fn,model_cls', [
    (vae.flux, vae.AutoencoderKL), (vae.tiny, vae.LightAutoencoder)])
def test_eval_shape_and_logical_axes(config_fn, model_cls):
  model = nnx.eval_shape(lambda: model_cls(config_fn(), rngs=nnx.Rngs(0)))
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  assert all(isinstance(var.get_value(), jax.ShapeDtypeStruct)
             for _, var in params)  # Nothing allocated.
  for path, var in params:
    names = var.get_metadata().get('out_sharding')
    assert names is not None and len(names) == len(var.shape), path
  if config_fn is vae.flux:
    assert _num_params(model) == _FLUX_PARAMS
    flux_dict = {**_TINY_KL, 'block_out_channels': (128, 256, 512, 512),
                 'layers_per_block': 2, 'latent_channels': 16,
                 'norm_num_groups': 32, 'use_quant_conv': False,
                 'use_post_quant_conv': False,
                 'down_block_types': ('DownEncoderBlock2D',) * 4,
                 'up_block_types': ('UpDecoderBlock2D',) * 4}
    assert sum(v.size for v in _diffusers_state_dict(flux_dict).values()
               ) == _FLUX_PARAMS
    assert model.latent_shape(256) == (32, 32, 16)


def test_jitted_encode_traces_once(light_model):
  chex.clear_trace_counter()
  graphdef, state = nnx.split(light_model)

  @functools.partial(jax.jit, static_argnums=0)
  @chex.assert_max_traces(n=1)
  def encode(graphdef, state, pixels):
    return nnx.merge(graphdef, state).encode(pixels)

  for seed in range(3):
    pixels = jax.random.uniform(jax.random.key(seed), (2, 32, 32, 3),
                                minval=-1, maxval=1)
    encode(graphdef, state, pixels)
  # New parameter values (as after an update) reuse the trace.
  encode(graphdef, jax.tree.map(lambda x: 0.5 * x, state), pixels)


def test_bad_state_dict_lists_every_problem():
  state_dict = _diffusers_state_dict(_TINY_KL)
  model = convert_vae.vae_from_diffusers(state_dict, _TINY_KL)
  assert _num_params(model) == sum(v.size for v in state_dict.values())

  del state_dict['decoder.conv_out.bias']
  state_dict['encoder.extra.weight'] = np.zeros(3, np.float32)
  state_dict['encoder.conv_in.weight'] = np.zeros((32, 3, 5, 5), np.float32)
  with pytest.raises(ValueError) as error:
    convert_vae.vae_from_diffusers(state_dict, _TINY_KL)
  message = str(error.value)
  assert "missing ['decoder.conv_out.bias']" in message
  assert "unexpected ['encoder.extra.weight']" in message
  assert 'mis-shaped' in message and 'encoder.conv_in.weight' in message
