"""SigLIP-style vision transformer: the understanding path's image encoder.

The architecture of transformers' `SiglipVisionModel` (and big_vision's ViT):
a stride-p patch convolution, learned position embeddings, pre-LayerNorm
encoder blocks (multi-head attention, tanh-GELU MLP), a final LayerNorm, no
class token, and an optional multi-head attention pooling (MAP) head that the
dual encoder uses for its image embedding.

The blocks here are shared with the dual encoder's text tower.

Shapes: B batch, R image side (pixels), C channels, N patch tokens
(= (R // p)^2 for patch size p), S key tokens, D width, H heads, E head dim
(D = H E), F MLP width.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lvrpo_jax.sharding import logical

_init = nnx.initializers


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Vision tower shapes; transformers' SiglipVisionConfig names in comments.

  `image_size` need not be a multiple of `patch_size`: as in SigLIP (384
  pixels, patch 14), the convolution drops the last `image_size % patch_size`
  rows and columns.
  """
  image_size: int  # image_size (square images)
  patch_size: int  # patch_size
  width: int  # hidden_size
  depth: int  # num_hidden_layers
  heads: int  # num_attention_heads
  mlp_dim: int  # intermediate_size
  channels: int = 3  # num_channels
  layer_norm_eps: float = 1e-6
  use_head: bool = True  # vision_use_head: the MAP pooling head
  dtype: str = 'float32'  # Activations; parameters are always float32.

  def __post_init__(self):
    for name in ('image_size', 'patch_size', 'width', 'depth', 'heads',
                 'mlp_dim', 'channels'):
      if getattr(self, name) < 1:
        raise ValueError(f'ViTConfig.{name} must be >= 1, got '
                         f'{getattr(self, name)}')
    if self.patch_size > self.image_size:
      raise ValueError(f'ViTConfig.patch_size={self.patch_size} exceeds '
                       f'image_size={self.image_size}')
    if self.width % self.heads:
      raise ValueError(f'ViTConfig.width={self.width} is not a multiple of '
                       f'heads={self.heads}')

  @property
  def grid(self) -> int:
    """Patches per image side."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2


def tiny() -> ViTConfig:
  """The CPU world's encoder: 32x32 images, 16 patch tokens, 163 k params."""
  return ViTConfig(image_size=32, patch_size=8, width=64, depth=2, heads=4,
                   mlp_dim=256)


def so400m_patch14(image_size: int = 384) -> ViTConfig:
  """SigLIP-so400m/14 (google/siglip-so400m-patch14-{224,384}) vision tower.

  428,225,600 parameters at 384 pixels (729 patches), MAP head included.
  """
  return ViTConfig(image_size=image_size, patch_size=14, width=1152,
                   depth=27, heads=16, mlp_dim=4304)


def layer_norm(dim: int, eps: float, dtype: str, rngs: nnx.Rngs):
  # Exact variance, as torch's LayerNorm: E[x^2] - E[x]^2 loses digits when
  # the mean is large relative to the spread (the residual stream often is).
  return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, use_fast_variance=False,
                       scale_init=logical(_init.ones_init(), 'embed'),
                       bias_init=logical(_init.zeros_init(), 'embed'),
                       rngs=rngs)


class HeadsIn(nnx.Module):
  """A query, key or value projection: x [..., D] -> [..., H, E]."""

  def __init__(self, width: int, heads: int, *, dtype: str,
               rngs: nnx.Rngs):
    head_dim = width // heads
    xavier = _init.xavier_uniform(in_axis=0, out_axis=(1, 2))
    self.kernel = nnx.Param(logical(xavier, 'embed', 'heads', 'head_dim')(
        rngs.params(), (width, heads, head_dim)))
    self.bias = nnx.Param(logical(_init.zeros_init(), 'heads', 'head_dim')(
        rngs.params(), (heads, head_dim)))
    self.dtype = dtype

  def __call__(self, x):
    kernel = self.kernel[...].astype(self.dtype)
    return (jnp.einsum('...d,dhe->...he', x.astype(self.dtype), kernel) +
            self.bias[...].astype(self.dtype))


class HeadsOut(nnx.Module):
  """The attention output projection: [..., H, E] -> [..., D]."""

  def __init__(self, width: int, heads: int, *, dtype: str,
               rngs: nnx.Rngs):
    head_dim = width // heads
    xavier = _init.xavier_uniform(in_axis=(0, 1), out_axis=2)
    self.kernel = nnx.Param(logical(xavier, 'heads', 'head_dim', 'embed')(
        rngs.params(), (heads, head_dim, width)))
    self.bias = nnx.Param(logical(_init.zeros_init(), 'embed')(
        rngs.params(), (width,)))
    self.dtype = dtype

  def __call__(self, x):
    kernel = self.kernel[...].astype(self.dtype)
    return (jnp.einsum('...he,hed->...d', x.astype(self.dtype), kernel) +
            self.bias[...].astype(self.dtype))


class Attention(nnx.Module):
  """Bidirectional multi-head attention with biases (SiglipAttention)."""

  def __init__(self, width: int, heads: int, *, dtype: str,
               rngs: nnx.Rngs):
    self.query = HeadsIn(width, heads, dtype=dtype, rngs=rngs)
    self.key = HeadsIn(width, heads, dtype=dtype, rngs=rngs)
    self.value = HeadsIn(width, heads, dtype=dtype, rngs=rngs)
    self.out = HeadsOut(width, heads, dtype=dtype, rngs=rngs)

  def __call__(self, x_bnd, kv_bsd):
    """Queries from x [B, N, D] attend to all of kv [B, S, D] -> [B, N, D]."""
    q, k, v = self.query(x_bnd), self.key(kv_bsd), self.value(kv_bsd)
    # Scale 1/sqrt(E) by default; no mask: every token sees every token.
    return self.out(jax.nn.dot_product_attention(q, k, v))


class Mlp(nnx.Module):
  """fc1 -> tanh-approximate GELU (gelu_pytorch_tanh) -> fc2."""

  def __init__(self, width: int, mlp_dim: int, *, dtype: str,
               rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(
        width, mlp_dim, dtype=dtype, rngs=rngs,
        kernel_init=logical(_init.xavier_uniform(), 'embed', 'mlp'),
        bias_init=logical(_init.normal(1e-6), 'mlp'))
    self.fc2 = nnx.Linear(
        mlp_dim, width, dtype=dtype, rngs=rngs,
        kernel_init=logical(_init.xavier_uniform(), 'mlp', 'embed'),
        bias_init=logical(_init.normal(1e-6), 'embed'))

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class Block(nnx.Module):
  """Pre-LayerNorm encoder block (SiglipEncoderLayer)."""

  def __init__(self, width: int, heads: int, mlp_dim: int, eps: float, *,
               dtype: str, rngs: nnx.Rngs):
    self.norm1 = layer_norm(width, eps, dtype, rngs)
    self.attn = Attention(width, heads, dtype=dtype, rngs=rngs)
    self.norm2 = layer_norm(width, eps, dtype, rngs)
    self.mlp = Mlp(width, mlp_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x_bnd):
    h = self.norm1(x_bnd)
    x_bnd = x_bnd + self.attn(h, h)
    return x_bnd + self.mlp(self.norm2(x_bnd))


class MAPHead(nnx.Module):
  """Multi-head attention pooling (SiglipMultiheadAttentionPoolingHead).

  A learned probe attends over the tokens; the result goes through a
  residual LayerNorm + MLP block.
  """

  def __init__(self, width: int, heads: int, mlp_dim: int, eps: float, *,
               dtype: str, rngs: nnx.Rngs):
    self.probe = nnx.Param(logical(_init.xavier_uniform(), None, None,
                                   'embed')(rngs.params(), (1, 1, width)))
    self.attn = Attention(width, heads, dtype=dtype, rngs=rngs)
    self.norm = layer_norm(width, eps, dtype, rngs)
    self.mlp = Mlp(width, mlp_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x_bnd):
    """Pooled [B, D]."""
    probe = jnp.broadcast_to(self.probe[...].astype(x_bnd.dtype),
                             (x_bnd.shape[0], 1, x_bnd.shape[2]))
    h = self.attn(probe, x_bnd)
    return (h + self.mlp(self.norm(h)))[:, 0]

  def per_token(self, x_bnd):
    """Each token through the head as if the probe attended to it alone.

    The probe's attention output is a convex combination of the tokens'
    value paths out(value(x_n)) (both maps are affine and the weights sum
    to one), so out(value(x_n)) is the attention output of a probe that put
    all its weight on token n, and the residual MLP block turns it into that
    token's embedding in the pooled output's space (MaskCLIP's trick for
    dense features, applied to a MAP head).

    Returns:
      [B, N, D]; equal to `__call__` on an input whose N tokens are equal.
    """
    h = self.attn.out(self.attn.value(x_bnd))
    return h + self.mlp(self.norm(h))


def check_pixels(pixels, config: ViTConfig) -> jax.Array:
  """`pixels` as a jax array, or a ValueError saying what is wrong with it.

  Runs on shapes and dtypes only, so it also works (and fails before any
  compile) while tracing.
  """
  pixels = jnp.asarray(pixels)
  want = (config.image_size, config.image_size, config.channels)
  if pixels.ndim != 4:
    raise ValueError(f'pixels must be [B, H, W, C] = [B, {want[0]}, '
                     f'{want[1]}, {want[2]}], got shape {pixels.shape}')
  if not jnp.issubdtype(pixels.dtype, jnp.floating):
    raise ValueError(f'pixels must be floating point in [-1, 1], got '
                     f'{pixels.dtype} (uint8 images: x / 127.5 - 1)')
  if tuple(pixels.shape[1:]) != want:
    layout = (' (NCHW? this model takes NHWC)'
              if pixels.shape[1] == config.channels else '')
    raise ValueError(f'pixels must be [B, {want[0]}, {want[1]}, {want[2]}], '
                     f'got shape {pixels.shape}{layout}')
  return pixels


class ViT(nnx.Module):
  """SigLIP vision tower: pixels -> patch tokens (and a pooled embedding)."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    self.config = config
    c, p, d = config.channels, config.patch_size, config.width
    self.patch_embed = nnx.Conv(
        c, d, kernel_size=(p, p), strides=(p, p), padding='VALID',
        dtype=config.dtype, rngs=rngs,
        kernel_init=logical(_init.lecun_normal(), 'conv', 'conv', 'channels',
                            'embed'),
        bias_init=logical(_init.zeros_init(), 'embed'))
    self.pos_embed = nnx.Param(logical(_init.normal(d ** -0.5), 'length',
                                       'embed')(
        rngs.params(), (config.num_patches, d)))
    self.blocks = nnx.List([
        Block(d, config.heads, config.mlp_dim, config.layer_norm_eps,
              dtype=config.dtype, rngs=rngs) for _ in range(config.depth)])
    self.post_norm = layer_norm(d, config.layer_norm_eps, config.dtype, rngs)
    self.head = (MAPHead(d, config.heads, config.mlp_dim,
                         config.layer_norm_eps, dtype=config.dtype, rngs=rngs)
                 if config.use_head else None)

  def __call__(self, pixels_bhwc):
    """Patch tokens after the final LayerNorm.

    Args:
      pixels_bhwc: [B, R, R, C] floating point in [-1, 1] (SigLIP's
        preprocessing: x / 127.5 - 1), channels last.

    Returns:
      [B, N, D]: transformers' `last_hidden_state`; patches in row-major
      order (row 0 left to right, then row 1, ...).

    Raises:
      ValueError: for a wrong rank, dtype or image size.
    """
    pixels_bhwc = check_pixels(pixels_bhwc, self.config)
    x = self.patch_embed(pixels_bhwc.astype(self.config.dtype))
    x_bnd = x.reshape(x.shape[0], -1, x.shape[-1])
    x_bnd = x_bnd + self.pos_embed[...].astype(x_bnd.dtype)
    for block in self.blocks:
      x_bnd = block(x_bnd)
    return self.post_norm(x_bnd)

  def pool(self, hidden_bnd):
    """MAP-head embedding [B, D] of `__call__`'s output (`pooler_output`)."""
    return self._head()(hidden_bnd)

  def pool_tokens(self, hidden_bnd):
    """Per-patch MAP-head features [B, N, D]; see `MAPHead.per_token`."""
    return self._head().per_token(hidden_bnd)

  def _head(self) -> MAPHead:
    if self.head is None:
      raise ValueError('this ViT has no pooling head (config.use_head is '
                       'False)')
    return self.head
