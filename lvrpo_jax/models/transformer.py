"""Qwen2-style transformer pieces: RMSNorm, RoPE, GQA attention, SwiGLU.

The Mixture-of-Transformers (`mot.py`) gives every layer two `Expert`s that
share one attention computation; this module holds what an expert is made of
and the attention itself, with a key/value cache.

Shapes: B batch, T query tokens, S key tokens (cache slots), D model width,
H query heads, K key/value heads (H % K == 0), E head dim, F MLP width.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lvrpo_jax.sharding import logical

_NEG_INF = -1e30  # Finite, so a fully masked row gives a uniform, not NaN.


# What a rematerialized layer (`remat`) saves for its backward pass; the
# rest is recomputed there. Names as `jax.ad_checkpoint.checkpoint_name`
# tags them: 'qkv_proj' (the q, k, v projections, before QK-norm and RoPE)
# and 'attention' (the attention output, before the o projection).
REMAT_POLICIES = {
    # Nothing: the layer runs twice (least memory, about a third more
    # FLOPs for a training step).
    'full': jax.checkpoint_policies.nothing_saveable,
    # Every matmul without batch dimensions, i.e. the projections and the
    # MLP: only norms, RoPE, the attention core and elementwise ops rerun.
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The q, k, v projections (MaxText's save_qkv_proj).
    'qkv': jax.checkpoint_policies.save_only_these_names('qkv_proj'),
    # Those and the attention output: the MLP block reruns.
    'qkv_attention': jax.checkpoint_policies.save_only_these_names(
        'qkv_proj', 'attention'),
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Backbone shapes (names follow transformers' Qwen2Config)."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  qk_norm: bool = False  # Qwen2 has none; BAGEL adds it to both experts.
  tie_embeddings: bool = False
  max_len: int = 512
  # Activations and matmuls (the KV cache too); parameters are always
  # float32, the master copy the optimizer updates ('bfloat16': mixed
  # precision). Softmaxes, log-probs and losses run in float32 regardless.
  dtype: str = 'float32'
  # Stack the layers' parameters ([L, ...], logical axis 'layers') and run
  # them as one scanned layer, so compile time does not grow with depth
  # (MaxText's scan_layers). The same function either way.
  scan_layers: bool = False
  # Recompute each layer's activations in the backward pass instead of
  # keeping them (jax.checkpoint per layer): activation memory for FLOPs.
  remat: bool = False
  # With remat, what each layer keeps for the backward pass (REMAT_POLICIES).
  remat_policy: str = 'full'

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'remat_policy {self.remat_policy!r}; one of '
                       f'{tuple(REMAT_POLICIES)}')
    if self.remat_policy != 'full' and not self.remat:
      raise ValueError(f'remat_policy {self.remat_policy!r} needs remat')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not a multiple of '
                       f'num_kv_heads={self.num_kv_heads}')
    if self.head_dim % 2:
      raise ValueError(f'head_dim={self.head_dim} must be even for RoPE')


def check_token_ids(ids, vocab_size: int, max_len: int) -> jax.Array:
  """`ids` as a jax array, or a ValueError naming what is wrong with them.

  Rank, dtype and length are checked always (also while tracing); the id
  range only for concrete arrays, since an out-of-range id would otherwise
  silently embed as garbage.
  """
  ids = jnp.asarray(ids)
  if ids.ndim != 2:
    raise ValueError(f'token ids must be [B, T], got shape {ids.shape}')
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f'token ids must be integers, got {ids.dtype}')
  if not 1 <= ids.shape[1] <= max_len:
    raise ValueError(f'sequence of {ids.shape[1]} tokens; 1 to '
                     f'max_len={max_len} allowed')
  if not isinstance(ids, jax.core.Tracer):
    values = np.asarray(ids)
    bad = values[(values < 0) | (values >= vocab_size)]
    if bad.size:
      raise ValueError(f'token ids {sorted(set(bad.tolist()))[:10]} outside '
                       f'the vocabulary [0, {vocab_size})')
  return ids


def dense(rngs, din, dout, names, bias=False, dtype='float32'):
  """A Linear layer whose kernel (and bias) carry logical axis names;
  float32 parameters, computing in `dtype`."""
  return nnx.Linear(
      din, dout, use_bias=bias, rngs=rngs, dtype=dtype,
      kernel_init=logical(nnx.initializers.normal(0.02), *names),
      bias_init=logical(nnx.initializers.zeros_init(), names[1]))


def rms_norm(rngs, dim, eps, name, dtype='float32'):
  """Qwen2's RMSNorm (scale only), its scale carrying a logical name; the
  mean square is reduced in float32 whatever `dtype` (flax's default)."""
  return nnx.RMSNorm(dim, epsilon=eps, rngs=rngs, dtype=dtype,
                     scale_init=logical(nnx.initializers.ones_init(), name))


class Expert(nnx.Module):
  """One expert of one layer: its norms, q/k/v/o projections and MLP."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    d, e, dt = cfg.hidden_size, cfg.head_dim, cfg.dtype
    eps = cfg.rms_norm_eps
    self.input_norm = rms_norm(rngs, d, eps, 'embed', dt)
    self.q = dense(rngs, d, cfg.num_heads * e, ('embed', 'heads'), True, dt)
    self.k = dense(rngs, d, cfg.num_kv_heads * e, ('embed', 'kv_heads'), True,
                   dt)
    self.v = dense(rngs, d, cfg.num_kv_heads * e, ('embed', 'kv_heads'), True,
                   dt)
    self.o = dense(rngs, cfg.num_heads * e, d, ('heads', 'embed'), dtype=dt)
    if cfg.qk_norm:
      self.q_norm = rms_norm(rngs, e, eps, 'head_dim', dt)
      self.k_norm = rms_norm(rngs, e, eps, 'head_dim', dt)
    self.post_norm = rms_norm(rngs, d, eps, 'embed', dt)
    f = cfg.intermediate_size
    self.gate = dense(rngs, d, f, ('embed', 'mlp'), dtype=dt)
    self.up = dense(rngs, d, f, ('embed', 'mlp'), dtype=dt)
    self.down = dense(rngs, f, d, ('mlp', 'embed'), dtype=dt)
    self.num_heads, self.num_kv_heads, self.head_dim = (
        cfg.num_heads, cfg.num_kv_heads, e)
    self.qk_norm = cfg.qk_norm

  # Dense layers run on [B*T, D]: XLA's CPU backward of a dot with two
  # contracting batch-like dims ([B, T, D] x [B, T, F] -> [D, F]) is ~1.6x
  # slower than the same dot on flattened tokens (measured here).

  def qkv(self, x_btd):
    """Pre-norm projections: q [B,T,H,E], k and v [B,T,K,E] (before RoPE)."""
    b, t, d = x_btd.shape
    h = self.input_norm(x_btd.reshape(b * t, d))
    q, k, v = (checkpoint_name(x, 'qkv_proj') for x in (
        self.q(h).reshape(b, t, self.num_heads, self.head_dim),
        self.k(h).reshape(b, t, self.num_kv_heads, self.head_dim),
        self.v(h).reshape(b, t, self.num_kv_heads, self.head_dim)))
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    return q, k, v

  def finish(self, x_btd, attn_bthe):
    """Residual after attention, then the SwiGLU MLP block."""
    b, t, d = x_btd.shape
    x = x_btd.reshape(b * t, d) + self.o(
        attn_bthe.reshape(b * t, self.num_heads * self.head_dim))
    h = self.post_norm(x)
    x = x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))
    return x.reshape(b, t, d)


def rope_tables(positions_bt, head_dim: int, theta: float):
  """(cos, sin) [B, T, 1, E] of the rotary embedding at `positions_bt`;
  computed once per forward and shared by every layer's q and k."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32)
                              / head_dim))
  angles = positions_bt[..., None].astype(jnp.float32) * inv_freq  # [B,T,E/2]
  angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]
  return jnp.cos(angles), jnp.sin(angles)


def rope(x_bthe, tables):
  """Rotary embedding (rotate-half convention, as Qwen2/transformers)."""
  cos, sin = tables
  x1, x2 = jnp.split(x_bthe, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x_bthe * cos + rotated * sin).astype(x_bthe.dtype)


def attention(q_bthe, k_bske, v_bske, mask_bts):
  """Grouped-query softmax attention.

  Args:
    q_bthe: queries [B, T, H, E].
    k_bske, v_bske: keys and values [B, S, K, E].
    mask_bts: bool [B, T, S], True where query t may attend to key s.

  Returns:
    [B, T, H, E].
  """
  b, t, h, e = q_bthe.shape
  kv = k_bske.shape[2]
  q = q_bthe.reshape(b, t, kv, h // kv, e)
  logits = jnp.einsum('btkge,bske->bkgts', q, k_bske).astype(jnp.float32)
  logits = logits * (e ** -0.5)
  logits = jnp.where(mask_bts[:, None, None], logits, _NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_bske.dtype)
  out = jnp.einsum('bkgts,bske->btkge', probs, v_bske)
  return checkpoint_name(out.reshape(b, t, h, e), 'attention')


def attention_mask(q_pos_bt, k_pos_bs, q_seg_bt, k_seg_bs, k_valid_bs):
  """The unified model's mask.

  Text is causal; tokens of one image (same segment id > 0) see each other
  both ways; later tokens see earlier ones; padding keys are never seen.

  Args:
    q_pos_bt, k_pos_bs: positions in the sequence (int).
    q_seg_bt, k_seg_bs: segment ids, 0 for text, k > 0 for the k-th image.
    k_valid_bs: bool, False for padding and empty cache slots.

  Returns:
    bool [B, T, S].
  """
  causal = k_pos_bs[:, None, :] <= q_pos_bt[:, :, None]
  same_image = ((q_seg_bt[:, :, None] == k_seg_bs[:, None, :])
                & (q_seg_bt[:, :, None] > 0))
  return (causal | same_image) & k_valid_bs[:, None, :]
