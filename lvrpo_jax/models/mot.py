"""The BAGEL-style Mixture-of-Transformers backbone.

Every layer has two experts, `und` (text and ViT tokens) and `gen` (noised
VAE-latent tokens), each with its own norms, q/k/v/o and MLP (DESIGN §3).
Attention is computed jointly over the whole sequence. Tokens are routed by a
static layout: the latent tokens of a sequence occupy one contiguous span
`gen_span = (start, stop)` (the same for every row, known at trace time), so
each expert runs on exactly its own tokens — two slices and a concatenation,
never both experts on every token.

With `scan_layers` the L layers are one `Layer` whose parameters are
stacked [L, ...] and run by `jax.lax.scan` (compile time independent of
depth); unrolled, they are a list of Layers. Both call the same
`Layer.__call__`, under `jax.checkpoint` with `remat` (activations
recomputed in the backward, as `remat_policy` says).

The forward pass always goes through a key/value cache: an uncached forward
is a prefill into an empty cache as long as the sequence. The cache is a
value (a pytree), so a caller that must not keep what it wrote — the image
sampler recomputing latents at every step on top of a shared prompt — simply
drops the returned cache.

Shapes: B batch, T new tokens, S cache slots, D width, V vocab, L layers.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lvrpo_jax.models import transformer
from lvrpo_jax.models.transformer import TransformerConfig
from lvrpo_jax.sharding import logical


@dataclasses.dataclass
class Cache:
  """Keys/values of every layer for S slots, and what each slot holds."""
  k: jax.Array  # [L, B, S, K, E]
  v: jax.Array  # [L, B, S, K, E]
  positions: jax.Array  # int32 [B, S], RoPE / causal position of the slot.
  segments: jax.Array  # int32 [B, S], 0 text, n > 0 the n-th image.
  valid: jax.Array  # bool [B, S], False for padding and unwritten slots.


jax.tree_util.register_dataclass(
    Cache, data_fields=['k', 'v', 'positions', 'segments', 'valid'],
    meta_fields=[])


def init_cache(cfg: TransformerConfig, batch: int, slots: int,
               dtype=None) -> Cache:
  """An empty cache of `slots` slots; keys/values in `dtype`, by default
  the backbone's compute dtype."""
  dtype = cfg.dtype if dtype is None else dtype
  shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
  return Cache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.zeros((batch, slots), jnp.int32),
               jnp.zeros((batch, slots), jnp.int32),
               jnp.zeros((batch, slots), bool))


class Layer(nnx.Module):

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.und = transformer.Expert(cfg, rngs=rngs)
    self.gen = transformer.Expert(cfg, rngs=rngs)

  def __call__(self, x_und, x_gen, k_slots, v_slots, mask, tables, index,
               gen_span):
    """One layer on both experts' tokens; writes its keys/values into its
    cache slots [B, S, K, E] and returns (x_und, x_gen, keys, values)."""
    q, k, v = (_merge(a, b, gen_span) for a, b in zip(self.und.qkv(x_und),
                                                      self.gen.qkv(x_gen)))
    q, k = transformer.rope(q, tables), transformer.rope(k, tables)
    keys = _write(k_slots, k.astype(k_slots.dtype), index)
    values = _write(v_slots, v.astype(v_slots.dtype), index)
    out_und, out_gen = _split(transformer.attention(q, keys, values, mask),
                              gen_span)
    return (self.und.finish(x_und, out_und), self.gen.finish(x_gen, out_gen),
            keys, values)


def _stacked_layers(cfg: TransformerConfig, rngs: nnx.Rngs) -> Layer:
  """L layers as one Layer whose parameters are stacked [L, ...]."""

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0,
            transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def make(rngs):
    return Layer(cfg, rngs=rngs)

  return make(rngs)


def _split(x, span):
  """Sequence-ordered [B, T, ...] -> (und tokens, gen tokens)."""
  start, stop = span
  return (jnp.concatenate([x[:, :start], x[:, stop:]], axis=1),
          x[:, start:stop])


def _merge(und, gen, span):
  """Inverse of `_split`."""
  start = span[0]
  return jnp.concatenate([und[:, :start], gen, und[:, start:]], axis=1)


class MoT(nnx.Module):
  """Token embedding, L two-expert layers, final norms and the LM head."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embed = nnx.Embed(
        cfg.vocab_size, cfg.hidden_size, rngs=rngs, dtype=cfg.dtype,
        embedding_init=logical(nnx.initializers.normal(0.02), 'vocab',
                               'embed'))
    if cfg.scan_layers:
      self.layers = _stacked_layers(cfg, rngs)
    else:
      self.layers = nnx.List([Layer(cfg, rngs=rngs)
                              for _ in range(cfg.num_layers)])
    self.und_norm = transformer.rms_norm(rngs, cfg.hidden_size,
                                         cfg.rms_norm_eps, 'embed', cfg.dtype)
    self.gen_norm = transformer.rms_norm(rngs, cfg.hidden_size,
                                         cfg.rms_norm_eps, 'embed', cfg.dtype)
    if not cfg.tie_embeddings:
      self.lm_head = transformer.dense(rngs, cfg.hidden_size, cfg.vocab_size,
                                       ('embed', 'vocab'), dtype=cfg.dtype)

  def __call__(self, x_btd, positions_bt, segments_bt, valid_bt,
               cache: Cache, index, gen_span=(0, 0)):
    """Runs the backbone on T new tokens written at cache slots [index, +T).

    Args:
      x_btd: input embeddings [B, T, D] (text embeddings, ViT or latent
        tokens, already projected to D).
      positions_bt: int positions (RoPE and causality).
      segments_bt: int segment ids (0 text, n > 0 the n-th image).
      valid_bt: bool, False for padding.
      cache: holds the keys/values of earlier tokens.
      index: first cache slot to write (int or scalar int array).
      gen_span: static (start, stop) of the latent tokens within the T.

    Returns:
      (hidden [B, T, D] after each expert's final norm, updated cache).
    """
    cfg = self.config
    cache = Cache(cache.k, cache.v,
                  _write(cache.positions, positions_bt, index),
                  _write(cache.segments, segments_bt, index),
                  _write(cache.valid, valid_bt, index))
    mask = transformer.attention_mask(positions_bt, cache.positions,
                                      segments_bt, cache.segments,
                                      cache.valid)
    tables = transformer.rope_tables(positions_bt, cfg.head_dim,
                                     cfg.rope_theta)
    x_und, x_gen = _split(x_btd, gen_span)

    # The layers run as pure functions of their parameters (nnx.split, then
    # jax.checkpoint / jax.lax.scan over the arrays), not through nnx.remat /
    # nnx.scan: those refuse a model that a caller's jax loop closes over
    # (the decoders and samplers step the model inside jax.lax.scan).
    def run_layer(graphdef, params, x_und, x_gen, k_slots, v_slots):
      return nnx.merge(graphdef, params)(x_und, x_gen, k_slots, v_slots, mask,
                                         tables, index, gen_span)

    if cfg.remat:
      run_layer = jax.checkpoint(
          run_layer, static_argnums=(0,),
          policy=transformer.REMAT_POLICIES[cfg.remat_policy])
    if cfg.scan_layers:
      graphdef, stacked = nnx.split(self.layers)

      def layer_step(xs, per_layer):
        params, k_slots, v_slots = per_layer
        x_und, x_gen, keys, values = run_layer(graphdef, params, *xs, k_slots,
                                               v_slots)
        return (x_und, x_gen), (keys, values)

      (x_und, x_gen), (new_k, new_v) = jax.lax.scan(
          layer_step, (x_und, x_gen), (stacked, cache.k, cache.v))
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        x_und, x_gen, keys, values = run_layer(*nnx.split(layer), x_und,
                                               x_gen, cache.k[i], cache.v[i])
        new_k.append(keys)
        new_v.append(values)
      new_k, new_v = jnp.stack(new_k), jnp.stack(new_v)
    hidden = _merge(self.und_norm(x_und), self.gen_norm(x_gen), gen_span)
    cache = Cache(new_k, new_v, cache.positions, cache.segments, cache.valid)
    return hidden, cache

  def lm_logits(self, hidden_btd):
    """Next-token logits [B, T, V] of `und` hidden states."""
    if self.config.tie_embeddings:
      return self.embed.attend(hidden_btd)
    return self.lm_head(hidden_btd)

  def text_logits(self, tokens_bt, valid_bt=None):
    """Logits [B, T, V] of a text-only causal sequence (no cache kept)."""
    check_tokens(tokens_bt, self.config)
    b, t = tokens_bt.shape
    valid_bt = jnp.ones((b, t), bool) if valid_bt is None else valid_bt
    hidden, _ = self(self.embed(tokens_bt), positions_of(valid_bt),
                     jnp.zeros((b, t), jnp.int32), valid_bt,
                     init_cache(self.config, b, t), 0)
    return self.lm_logits(hidden)


def positions_of(valid_bt, segments_bt=None):
  """RoPE positions counting valid tokens only, so padding anywhere (left of
  a prompt, between ViT tokens and a question) leaves every valid token's
  position, and hence the model's output, unchanged.

  With `segments_bt`, the tokens of one image (a run of one segment id
  > 0) share the position of its first token, and the token after the
  image takes the next one (BAGEL's convention: one RoPE position per
  image). Equal positions are also what makes the causal mask
  bidirectional within the image.
  """
  advance = valid_bt
  if segments_bt is not None:
    previous = jnp.pad(segments_bt, ((0, 0), (1, 0)),
                       constant_values=-1)[:, :-1]
    advance = valid_bt & ((segments_bt == 0) | (segments_bt != previous))
  return jnp.maximum(jnp.cumsum(advance.astype(jnp.int32), axis=1) - 1, 0)


def next_position(cache: Cache, context_len: int):
  """[B] position of the token after the first `context_len` cache slots:
  one past the largest valid position (the count of valid tokens when every
  token has its own position)."""
  positions = jnp.where(cache.valid[:, :context_len],
                        cache.positions[:, :context_len], -1)
  return positions.max(axis=1) + 1


def _write(buffer, update, index):
  """buffer[:, index:index + T] = update, for [B, S, ...] buffers."""
  start = (0, index) + (0,) * (buffer.ndim - 2)
  return jax.lax.dynamic_update_slice(buffer, update.astype(buffer.dtype),
                                      start)


def check_tokens(tokens, cfg: TransformerConfig):
  """ValueError for ids outside the vocabulary, sequences longer than
  `cfg.max_len`, or a wrong rank or dtype (before anything compiles)."""
  return transformer.check_token_ids(tokens, cfg.vocab_size, cfg.max_len)
