"""Latent autoencoders behind one encode/decode interface (DESIGN section 7).

- `AutoencoderKL`: the diffusers AutoencoderKL architecture (SD, SD3, FLUX
  VAEs), for real checkpoints (`convert_vae.vae_from_diffusers`).
- `LightAutoencoder`: a light f8 autoencoder for the tiny CPU preset: a
  stride-8 patch stem, 3x3 convs at the latent resolution and a per-cell MLP
  decoder (pixel shuffle): 0.028 s vs 0.24 s per training step on 2 CPU
  cores (DESIGN section 7).

Both are `LatentAutoencoder`s:
  encode(pixels_bhwc) -> (mean_bhwc, logvar_bhwc)   pixels in [-1, 1]
  decode(latents_bhwc) -> pixels_bhwc               not clipped
  latent_shape(image_size) -> (h, w, C)
  normalize_latents(z) / denormalize_latents(z)     (z - shift) * scale
The flow model works on normalized latents:
`z = normalize_latents(mean)`, `decode(denormalize_latents(z))`.
Sampling from (mean, logvar) and any noise on the latents are the trainer's.

Layout is NHWC throughout (PyTorch checkpoints are NCHW; conversion
transposes the weights, not the activations). Legend: B batch, H/W pixel
height/width, h/w latent height/width, C channels, N spatial positions.
"""

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from lvrpo_jax.sharding import logical

# diffusers' DiagonalGaussianDistribution clamps logvar to this range; we do
# the same so `encode` returns exactly its (mean, logvar).
_LOGVAR_RANGE = (-30.0, 20.0)
# Every normalization in the diffusers VAE uses this epsilon.
_NORM_EPS = 1e-6


def _conv(in_ch: int, out_ch: int, kernel: int, rngs: nnx.Rngs, *,
          stride: int = 1, padding: Any = 'SAME') -> nnx.Conv:
  # VAE parameters are small next to their activations: replicated
  # ('channels' and 'conv' map to no mesh axis); the batch carries sharding.
  return nnx.Conv(
      in_ch, out_ch, (kernel, kernel), strides=stride, padding=padding,
      kernel_init=logical(nnx.initializers.lecun_normal(),
                          'conv', 'conv', 'channels', 'channels'),
      bias_init=logical(nnx.initializers.zeros_init(), 'channels'),
      rngs=rngs)


def _linear(in_ch: int, out_ch: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
      in_ch, out_ch,
      kernel_init=logical(nnx.initializers.lecun_normal(),
                          'channels', 'channels'),
      bias_init=logical(nnx.initializers.zeros_init(), 'channels'),
      rngs=rngs)


def _group_norm(ch: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
  # Two-pass variance, as PyTorch: VAE activations can be large (SDXL's
  # overflow fp16), and E[x^2] - E[x]^2 then cancels catastrophically.
  return nnx.GroupNorm(
      ch, groups, epsilon=_NORM_EPS, use_fast_variance=False,
      scale_init=logical(nnx.initializers.ones_init(), 'channels'),
      bias_init=logical(nnx.initializers.zeros_init(), 'channels'),
      rngs=rngs)


def to_uint8(pixels: jax.Array) -> jax.Array:
  """[-1, 1] float pixels (any shape) -> uint8 [0, 255], clipped, rounded."""
  return jnp.round((jnp.clip(pixels, -1.0, 1.0) + 1.0) * 127.5).astype(
      jnp.uint8)


def from_uint8(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] images (any shape) -> float32 pixels in [-1, 1]."""
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def _check_array(x, what: str, channels: int, factor: int) -> None:
  """ValueError unless `x` is a float [B, H, W, channels], H, W % factor 0."""
  shape, dtype = jnp.shape(x), jnp.result_type(x)
  if len(shape) != 4:
    raise ValueError(f'{what} must be [B, H, W, {channels}] (NHWC); got '
                     f'rank {len(shape)}, shape {shape}')
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'{what} must be floating point; got {dtype}'
                     + (' (use vae.from_uint8 for images)'
                        if dtype == jnp.uint8 else ''))
  _, height, width, ch = shape
  if ch != channels:
    raise ValueError(f'{what} must have {channels} channels (NHWC); got '
                     f'shape {shape}')
  if height % factor or width % factor or not height or not width:
    raise ValueError(f'{what} height and width must be positive multiples '
                     f'of {factor}; got shape {shape}')


class LatentAutoencoder(nnx.Module):
  """The interface both autoencoders implement; validates at the boundary.

  Subclasses set `self.config` (with in_channels, out_channels,
  latent_channels, scaling_factor, shift_factor and a `downsample_factor`
  property) and implement `_moments(pixels [B, H, W, in]) -> [B, h, w, 2C]`
  (mean and logvar, concatenated) and `_pixels(latents [B, h, w, C]) ->
  [B, H, W, out]`.
  """
  config: Any

  def encode(self, pixels_bhwc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Encodes images to the posterior's moments.

    Args:
      pixels_bhwc: float [B, H, W, in_channels] in [-1, 1]; H and W
        multiples of `config.downsample_factor`.

    Returns:
      (mean, logvar), each float [B, H/f, W/f, latent_channels] (raw, not
      normalized); logvar clamped to [-30, 20] as in diffusers.
    """
    cfg = self.config
    _check_array(pixels_bhwc, 'pixels', cfg.in_channels,
                 cfg.downsample_factor)
    mean, logvar = jnp.split(self._moments(pixels_bhwc), 2, axis=-1)
    return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

  def decode(self, latents_bhwc: jax.Array) -> jax.Array:
    """Decodes raw latents [B, h, w, latent_channels] to pixels.

    Returns:
      float [B, h*f, w*f, out_channels], nominally in [-1, 1] (not clipped:
      losses see the raw output; `to_uint8` clips for display).
    """
    _check_array(latents_bhwc, 'latents', self.config.latent_channels, 1)
    return self._pixels(latents_bhwc)

  def latent_shape(self, image_size: int | tuple[int, int]
                   ) -> tuple[int, int, int]:
    """(h, w, C) of the latents of an image_size (S or (H, W)) image."""
    height, width = ((image_size, image_size) if isinstance(image_size, int)
                     else tuple(image_size))
    f = self.config.downsample_factor
    if height % f or width % f or height <= 0 or width <= 0:
      raise ValueError(f'image size {image_size} is not a positive multiple '
                       f'of the downsample factor {f}')
    return height // f, width // f, self.config.latent_channels

  def normalize_latents(self, latents: jax.Array) -> jax.Array:
    """Raw latents -> unit-scale latents for the flow model."""
    return (latents - self.config.shift_factor) * self.config.scaling_factor

  def denormalize_latents(self, latents: jax.Array) -> jax.Array:
    """Inverse of `normalize_latents`."""
    return latents / self.config.scaling_factor + self.config.shift_factor


# --------------------------------------------------------------------------
# AutoencoderKL (diffusers architecture).

# diffusers.AutoencoderKL.__init__ defaults: old config.json files omit the
# keys added later (shift_factor, use_quant_conv, ...) and diffusers fills
# them from here, so we must too.
_DIFFUSERS_DEFAULTS = {
    'in_channels': 3, 'out_channels': 3,
    'down_block_types': ('DownEncoderBlock2D',),
    'up_block_types': ('UpDecoderBlock2D',),
    'block_out_channels': (64,), 'layers_per_block': 1, 'act_fn': 'silu',
    'latent_channels': 4, 'norm_num_groups': 32, 'scaling_factor': 0.18215,
    'shift_factor': None, 'latents_mean': None, 'latents_std': None,
    'use_quant_conv': True, 'use_post_quant_conv': True,
    'mid_block_add_attention': True,
}
# Keys that change nothing in the forward pass.
_DIFFUSERS_IGNORED = ('sample_size', 'force_upcast')


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
  """Shapes of a diffusers AutoencoderKL (its config names)."""
  in_channels: int
  out_channels: int
  block_out_channels: tuple[int, ...]
  layers_per_block: int
  latent_channels: int
  norm_num_groups: int
  scaling_factor: float
  shift_factor: float
  use_quant_conv: bool
  use_post_quant_conv: bool
  mid_block_add_attention: bool

  def __post_init__(self):
    if not self.block_out_channels:
      raise ValueError('block_out_channels must not be empty')
    for ch in self.block_out_channels:
      if ch <= 0 or ch % self.norm_num_groups:
        raise ValueError(f'block_out_channels {self.block_out_channels} '
                         f'must be positive multiples of norm_num_groups='
                         f'{self.norm_num_groups}')
    if self.layers_per_block < 1:
      raise ValueError(f'layers_per_block={self.layers_per_block} must be '
                       '>= 1')
    if self.scaling_factor == 0:
      raise ValueError('scaling_factor must not be 0')

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> 'AutoencoderKLConfig':
    """From a diffusers AutoencoderKL config (config.json or `.config`)."""
    unknown = sorted(k for k in config if not k.startswith('_') and
                     k not in _DIFFUSERS_DEFAULTS and
                     k not in _DIFFUSERS_IGNORED)
    if unknown:
      raise ValueError(f'unknown AutoencoderKL config keys {unknown}')
    c = {**_DIFFUSERS_DEFAULTS,
         **{k: v for k, v in config.items() if k in _DIFFUSERS_DEFAULTS}}
    n = len(c['block_out_channels'])
    for key, block in (('down_block_types', 'DownEncoderBlock2D'),
                       ('up_block_types', 'UpDecoderBlock2D')):
      if tuple(c[key]) != (block,) * n:
        raise ValueError(f'{key}={c[key]} unsupported: need {n} x {block!r}'
                         ' (one per block_out_channels)')
    if c['act_fn'] != 'silu':
      raise ValueError(f"act_fn={c['act_fn']!r} unsupported: need 'silu'")
    for key in ('latents_mean', 'latents_std'):
      if c[key] is not None:
        raise ValueError(f'{key} is set: per-channel latent statistics are '
                         'not supported (only scaling/shift_factor)')
    return cls(
        in_channels=int(c['in_channels']),
        out_channels=int(c['out_channels']),
        block_out_channels=tuple(int(x) for x in c['block_out_channels']),
        layers_per_block=int(c['layers_per_block']),
        latent_channels=int(c['latent_channels']),
        norm_num_groups=int(c['norm_num_groups']),
        scaling_factor=float(c['scaling_factor']),
        shift_factor=float(c['shift_factor'] or 0.0),
        use_quant_conv=bool(c['use_quant_conv']),
        use_post_quant_conv=bool(c['use_post_quant_conv']),
        mid_block_add_attention=bool(c['mid_block_add_attention']))


def flux() -> AutoencoderKLConfig:
  """The FLUX.1 VAE (black-forest-labs/FLUX.1-dev, subfolder vae): f8,
  16 latent channels, 83,819,683 parameters."""
  return AutoencoderKLConfig(
      in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
      layers_per_block=2, latent_channels=16, norm_num_groups=32,
      scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
      use_post_quant_conv=False, mid_block_add_attention=True)


class ResnetBlock(nnx.Module):
  """diffusers ResnetBlock2D without time embedding: [B,H,W,in]->[..,out]."""

  def __init__(self, in_ch: int, out_ch: int, groups: int, rngs: nnx.Rngs):
    self.norm1 = _group_norm(in_ch, groups, rngs)
    self.conv1 = _conv(in_ch, out_ch, 3, rngs)
    self.norm2 = _group_norm(out_ch, groups, rngs)
    self.conv2 = _conv(out_ch, out_ch, 3, rngs)
    # A 1x1 projection only where the width changes, as in diffusers.
    self.conv_shortcut = (_conv(in_ch, out_ch, 1, rngs) if in_ch != out_ch
                          else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return skip + h


class Attention(nnx.Module):
  """Single-head spatial self-attention with a residual: [B,H,W,C]."""

  def __init__(self, ch: int, groups: int, rngs: nnx.Rngs):
    self.group_norm = _group_norm(ch, groups, rngs)
    self.to_q = _linear(ch, ch, rngs)
    self.to_k = _linear(ch, ch, rngs)
    self.to_v = _linear(ch, ch, rngs)
    self.to_out = _linear(ch, ch, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, ch = x.shape
    h = self.group_norm(x).reshape(b, height * width, 1, ch)  # [B, N, 1, C]
    h = jax.nn.dot_product_attention(self.to_q(h), self.to_k(h),
                                     self.to_v(h))  # Scale: C ** -0.5.
    return x + self.to_out(h).reshape(x.shape)


class MidBlock(nnx.Module):
  """diffusers UNetMidBlock2D: resnet, [attention], resnet; [B,H,W,C]."""

  def __init__(self, ch: int, groups: int, add_attention: bool,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(ch, ch, groups, rngs)
                             for _ in range(2)])
    self.attention = Attention(ch, groups, rngs) if add_attention else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if self.attention is not None:
      x = self.attention(x)
    return self.resnets[1](x)


class DownBlock(nnx.Module):
  """diffusers DownEncoderBlock2D: resnets, then [stride-2 conv]."""

  def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int,
               downsample: bool, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, rngs)
        for i in range(layers)])
    # diffusers pads (0, 1) on each spatial axis, then a VALID 3x3 stride-2
    # conv: asymmetric, so 'SAME' (which pads (0, 1) too only for even
    # sizes) is spelled out rather than relied on.
    self.downsample = (_conv(out_ch, out_ch, 3, rngs, stride=2,
                             padding=((0, 1), (0, 1)))
                       if downsample else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.downsample is None else self.downsample(x)


class UpBlock(nnx.Module):
  """diffusers UpDecoderBlock2D: resnets, then [nearest x2 + 3x3 conv]."""

  def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int,
               upsample: bool, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, rngs)
        for i in range(layers)])
    self.upsample = _conv(out_ch, out_ch, 3, rngs) if upsample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    if self.upsample is None:
      return x
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # Nearest x2.
    return self.upsample(x)


class Encoder(nnx.Module):
  """[B, H, W, in] -> [B, H/f, W/f, 2 * latent] (diffusers Encoder)."""

  def __init__(self, cfg: AutoencoderKLConfig, rngs: nnx.Rngs):
    chs, groups = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = _conv(cfg.in_channels, chs[0], 3, rngs)
    self.down_blocks = nnx.List([
        DownBlock(chs[max(i - 1, 0)], ch, cfg.layers_per_block, groups,
                  i < len(chs) - 1, rngs)
        for i, ch in enumerate(chs)])
    self.mid_block = MidBlock(chs[-1], groups, cfg.mid_block_add_attention,
                              rngs)
    self.conv_norm_out = _group_norm(chs[-1], groups, rngs)
    self.conv_out = _conv(chs[-1], 2 * cfg.latent_channels, 3, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """[B, h, w, latent] -> [B, h*f, w*f, out] (diffusers Decoder)."""

  def __init__(self, cfg: AutoencoderKLConfig, rngs: nnx.Rngs):
    chs, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
    self.conv_in = _conv(cfg.latent_channels, chs[0], 3, rngs)
    self.mid_block = MidBlock(chs[0], groups, cfg.mid_block_add_attention,
                              rngs)
    # One more resnet per block than the encoder, as in diffusers.
    self.up_blocks = nnx.List([
        UpBlock(chs[max(i - 1, 0)], ch, cfg.layers_per_block + 1, groups,
                i < len(chs) - 1, rngs)
        for i, ch in enumerate(chs)])
    self.conv_norm_out = _group_norm(chs[-1], groups, rngs)
    self.conv_out = _conv(chs[-1], cfg.out_channels, 3, rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(LatentAutoencoder):
  """The diffusers AutoencoderKL (SD / SD3 / FLUX VAEs), NHWC.

  Parameter paths mirror diffusers' state-dict names (see convert_vae.py).
  """

  def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs):
    self.config = config
    latent = config.latent_channels
    self.encoder = Encoder(config, rngs)
    self.decoder = Decoder(config, rngs)
    self.quant_conv = (_conv(2 * latent, 2 * latent, 1, rngs)
                       if config.use_quant_conv else None)
    self.post_quant_conv = (_conv(latent, latent, 1, rngs)
                            if config.use_post_quant_conv else None)

  def _moments(self, pixels_bhwc: jax.Array) -> jax.Array:
    moments = self.encoder(pixels_bhwc)
    return moments if self.quant_conv is None else self.quant_conv(moments)

  def _pixels(self, latents_bhwc: jax.Array) -> jax.Array:
    z = (latents_bhwc if self.post_quant_conv is None
         else self.post_quant_conv(latents_bhwc))
    return self.decoder(z)


# --------------------------------------------------------------------------
# The light autoencoder (tiny CPU preset).


@dataclasses.dataclass(frozen=True)
class LightAutoencoderConfig:
  """Shapes of the light autoencoder.

  patch_size: the stem's kernel and stride = the downsample factor.
  width: conv channels at the latent resolution.
  mlp_width: hidden width of the per-cell decoder MLP.
  """
  in_channels: int
  out_channels: int
  patch_size: int
  latent_channels: int
  width: int
  mlp_width: int
  scaling_factor: float
  shift_factor: float

  def __post_init__(self):
    for key in ('in_channels', 'out_channels', 'patch_size',
                'latent_channels', 'width', 'mlp_width'):
      if getattr(self, key) < 1:
        raise ValueError(f'{key}={getattr(self, key)} must be >= 1')
    if self.scaling_factor == 0:
      raise ValueError('scaling_factor must not be 0')

  @property
  def downsample_factor(self) -> int:
    return self.patch_size


def tiny() -> LightAutoencoderConfig:
  """The tiny CPU preset: 32x32x3 -> 4x4x8 (one latent cell per grid cell
  of the shapes world), ~0.13 M parameters."""
  return LightAutoencoderConfig(
      in_channels=3, out_channels=3, patch_size=8, latent_channels=8,
      width=64, mlp_width=256, scaling_factor=1.0, shift_factor=0.0)


class LightAutoencoder(LatentAutoencoder):
  """Patch-stem encoder and per-cell MLP decoder, f = patch_size.

  Encoder: p x p stride-p conv -> residual 3x3 conv -> 3x3 conv to (mean,
  logvar). Decoder: a 3x3 conv (so objects that straddle cells, as in the
  `free` layout, still see their neighbours) then an MLP per latent cell to
  its p*p*out pixels, pixel-shuffled into place.
  """

  def __init__(self, config: LightAutoencoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    c, p = config, config.patch_size
    self.stem = _conv(c.in_channels, c.width, p, rngs, stride=p,
                      padding='VALID')
    self.conv = _conv(c.width, c.width, 3, rngs)
    self.conv_out = _conv(c.width, 2 * c.latent_channels, 3, rngs)
    self.conv_in = _conv(c.latent_channels, c.width, 3, rngs)
    self.fc1 = _linear(c.width, c.mlp_width, rngs)
    self.fc2 = _linear(c.mlp_width, p * p * c.out_channels, rngs)

  def _moments(self, pixels_bhwc: jax.Array) -> jax.Array:
    h = self.stem(pixels_bhwc)  # [B, h, w, width]
    h = h + self.conv(jax.nn.silu(h))
    return self.conv_out(jax.nn.silu(h))

  def _pixels(self, latents_bhwc: jax.Array) -> jax.Array:
    h = jax.nn.silu(self.conv_in(latents_bhwc))
    cells = self.fc2(jax.nn.silu(self.fc1(h)))  # [B, h, w, p * p * out]
    b, height, width, _ = cells.shape
    p, out = self.config.patch_size, self.config.out_channels
    cells = cells.reshape(b, height, width, p, p, out)
    return cells.transpose(0, 1, 3, 2, 4, 5).reshape(
        b, height * p, width * p, out)
