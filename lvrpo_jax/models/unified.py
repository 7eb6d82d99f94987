"""The unified model: MoT backbone + ViT understanding + latent generation.

Sequence layouts (DESIGN §3), fixed lengths so every function traces once:
  understanding  [bos] [vit x Nv] [text ...]      text = question + answer,
                                                  right-padded with <pad>
  generation     [bos] [prompt ...] [boi] [latent x Ng]
                                                  prompt left-padded with
                                                  <pad>, so the latents sit
                                                  at a fixed span
ViT tokens enter through a 2-layer MLP connector and form image segment 1
(bidirectional); latent tokens are the VAE latent cut into p x p patches,
projected, plus a timestep embedding and a fixed 2-D sin-cos position
embedding; they form segment 1 of a generation sequence and are routed to
the `gen` expert, whose output a linear head turns into a velocity.
BAGEL's template (`image_brackets`, for imported BAGEL checkpoints) puts
every image within [boi] ... [eoi] and ends a generation prompt with [eos]:
  understanding  [boi] [vit x Nv] [eoi] [text ...]
  generation     [bos] [prompt ...] [eos] [boi] [latent x Ng] [eoi]

Rectified flow (SD3 / BAGEL convention): x_t = (1 - t) x_0 + t eps, the
model predicts v = eps - x_0; t = 1 is noise. Sampling integrates from t = 1
to 0 with a shifted schedule t' = s t / (1 + (s - 1) t).

Shapes: B batch, P prompt tokens, N latent tokens, C latent channels,
h x w latent grid, p latent patch, D width.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lvrpo_jax.models import mot as mot_lib
from lvrpo_jax.models import vit as vit_lib
from lvrpo_jax.models.transformer import TransformerConfig, dense
from lvrpo_jax.sharding import logical
from lvrpo_jax.world import tokenizer as tok

IMAGE_SEGMENT = 1
IMAGE_POSITIONS = ('sequential', 'shared')


@dataclasses.dataclass(frozen=True)
class UnifiedConfig:
  """Shapes of the unified model.

  Attributes:
    text: the MoT backbone.
    vit: the understanding encoder.
    latent_channels, latent_size: the VAE latent grid (C, h = w).
    latent_patch: p; the model sees (h / p)^2 latent tokens.
    timestep_shift: s of the shifted schedule (SD3 uses 3.0).
    vit_pos_embed: add a fixed 2-D sin-cos embedding of the patch grid to
      the connector's outputs (BAGEL's `vit_pos_embed`), so the backbone
      sees where each image token is, not only its place in the sequence.
    time_freq_dim: sinusoid features of the timestep embedding before its
      MLP; 0 means the backbone width (BAGEL: 256).
    time_scale: t in [0, 1] is multiplied by this before the sinusoids
      (DiT/SD3 style 1000; BAGEL embeds t itself: 1).
    sincos_w_first: the 2-D sin-cos tables put the column (w) coordinate's
      features first (BAGEL's `get_2d_sincos_pos_embed`); False puts the
      row's first.
    image_positions: 'sequential' gives every image token its own RoPE
      position; 'shared' gives all tokens of an image one position (BAGEL).
    image_brackets: BAGEL's template: every image is `[boi] tokens [eoi]`
      (one segment, routed to `und` but for the latents) and a generation
      prompt is `[bos] prompt [eos]`; understanding sequences are
      `[boi] [vit] [eoi] [text]`, the text carrying its own chat tokens.
      False: the world's `[bos] [vit] [text]` and `[bos] prompt [boi]`
      then the latents.
    bos, eos, boi, eoi, pad: special token ids.
  """
  text: TransformerConfig
  vit: vit_lib.ViTConfig
  latent_channels: int
  latent_size: int
  latent_patch: int = 1
  timestep_shift: float = 1.0
  vit_pos_embed: bool = False
  time_freq_dim: int = 0
  time_scale: float = 1000.0
  sincos_w_first: bool = False
  image_positions: str = 'sequential'
  image_brackets: bool = False
  bos: int = tok.BOS
  eos: int = tok.EOS
  boi: int = tok.BOI
  eoi: int = tok.EOI
  pad: int = tok.PAD

  def __post_init__(self):
    if self.latent_size % self.latent_patch:
      raise ValueError(f'latent_size={self.latent_size} is not a multiple of '
                       f'latent_patch={self.latent_patch}')
    specials = {k: getattr(self, k) for k in ('bos', 'eos', 'boi', 'eoi',
                                               'pad')}
    bad = {k: v for k, v in specials.items()
           if not 0 <= v < self.text.vocab_size}
    if bad:
      raise ValueError(f'special token ids {bad} outside the vocabulary '
                       f'[0, {self.text.vocab_size})')
    if self.image_positions not in IMAGE_POSITIONS:
      raise ValueError(f'image_positions={self.image_positions!r}; one of '
                       f'{IMAGE_POSITIONS}')

  @property
  def num_latent_tokens(self) -> int:
    return (self.latent_size // self.latent_patch) ** 2

  @property
  def latent_span(self) -> tuple[int, int]:
    """(start, stop) of the latents among a denoising step's tokens."""
    start = int(self.image_brackets)
    return start, start + self.num_latent_tokens

  @property
  def num_step_tokens(self) -> int:
    """Tokens of one denoising step: the latents, and the brackets."""
    return self.num_latent_tokens + 2 * int(self.image_brackets)

  @property
  def patch_dim(self) -> int:
    return self.latent_patch ** 2 * self.latent_channels


def shift_time(t, shift: float):
  """SD3's timestep shift: more time near noise for larger `shift`."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def sincos_2d(grid: int, dim: int, w_first: bool = False):
  """Fixed 2-D sin-cos position embedding [grid * grid, dim], row-major:
  [sin y, cos y, sin x, cos x] features of the row y and column x (x's
  first with `w_first`)."""
  if dim % 4:
    raise ValueError(f'width {dim} must be a multiple of 4 for 2-D sin-cos')
  quarter = dim // 4
  freqs = 1.0 / (10_000 ** (jnp.arange(quarter) / quarter))
  ys, xs = jnp.meshgrid(jnp.arange(grid), jnp.arange(grid), indexing='ij')
  coords = (ys.reshape(-1), xs.reshape(-1))
  out = []
  for coord in coords[::-1] if w_first else coords:
    angles = coord[:, None] * freqs[None]
    out += [jnp.sin(angles), jnp.cos(angles)]
  return jnp.concatenate(out, axis=-1)


def timestep_embedding(t_b, dim: int, scale: float = 1000.0):
  """Sinusoidal embedding [B, dim], [cos, sin], of t in [0, 1] times
  `scale`."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / half)
  angles = scale * t_b[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def patchify(latents_bhwc, p: int):
  """[B, h, w, C] -> [B, (h/p)(w/p), p*p*C], row-major over patches."""
  b, h, w, c = latents_bhwc.shape
  x = latents_bhwc.reshape(b, h // p, p, w // p, p, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), -1)


def unpatchify(tokens_bnd, p: int, size: int, channels: int):
  """Inverse of `patchify` for a size x size latent."""
  b, g = tokens_bnd.shape[0], size // p
  x = tokens_bnd.reshape(b, g, g, p, p, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, size, size, channels)


class UnifiedModel(nnx.Module):
  """MoT + ViT + connector + latent projections + velocity head."""

  def __init__(self, cfg: UnifiedConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    d = cfg.text.hidden_size
    self.mot = mot_lib.MoT(cfg.text, rngs=rngs)
    self.vit = vit_lib.ViT(cfg.vit, rngs=rngs)
    dt = cfg.text.dtype
    self.connector_in = dense(rngs, cfg.vit.width, d, ('channels', 'embed'),
                              True, dt)
    self.connector_out = dense(rngs, d, d, ('mlp', 'embed'), True, dt)
    self.latent_in = dense(rngs, cfg.patch_dim, d, ('channels', 'embed'),
                           True, dt)
    self.time_in = dense(rngs, cfg.time_freq_dim or d, d, ('mlp', 'embed'),
                         True, dt)
    self.time_out = dense(rngs, d, d, ('mlp', 'embed'), True, dt)
    self.velocity_out = nnx.Linear(
        d, cfg.patch_dim, rngs=rngs, dtype=dt,
        # Zero init: an untrained head predicts v = 0, a stable start.
        kernel_init=logical(nnx.initializers.zeros_init(), 'embed',
                            'channels'),
        bias_init=logical(nnx.initializers.zeros_init(), 'channels'))

  # --- inputs ---------------------------------------------------------------

  def vit_tokens(self, pixels_bhwc):
    """ViT features through the connector (plus the patch grid's position
    embedding with `vit_pos_embed`): [B, Nv, D]."""
    features = self.vit(pixels_bhwc)
    x = self.connector_out(jax.nn.gelu(self.connector_in(features)))
    if self.config.vit_pos_embed:
      grid = self.config.vit.image_size // self.config.vit.patch_size
      x = x + sincos_2d(grid, x.shape[-1], self.config.sincos_w_first
                        )[None].astype(x.dtype)
    return x

  def latent_tokens(self, latents_bhwc, t_b):
    """Noised latents -> gen-expert inputs [B, N, D]."""
    cfg = self.config
    d = cfg.text.hidden_size
    x = self.latent_in(patchify(latents_bhwc, cfg.latent_patch))
    freqs = timestep_embedding(t_b, cfg.time_freq_dim or d, cfg.time_scale)
    temb = self.time_out(jax.nn.silu(self.time_in(freqs)))
    grid = cfg.latent_size // cfg.latent_patch
    pos = sincos_2d(grid, d, cfg.sincos_w_first)
    return x + temb[:, None, :] + pos[None].astype(x.dtype)

  def velocity(self, hidden_bnd):
    """gen-expert outputs [B, N, D] -> velocity latents [B, h, w, C]."""
    cfg = self.config
    return unpatchify(self.velocity_out(hidden_bnd), cfg.latent_patch,
                      cfg.latent_size, cfg.latent_channels)

  # --- layouts --------------------------------------------------------------

  def _special(self, token: int, b: int):
    return self.mot.embed(jnp.full((b, 1), token, jnp.int32))

  def understanding_sequence(self, pixels_bhwc, text_bt):
    """[bos] [vit] [text] (or [boi] [vit] [eoi] [text] with image brackets)
    -> (x [B, T, D], positions, segments, valid)."""
    cfg = self.config
    b = text_bt.shape[0]
    image = self.vit_tokens(pixels_bhwc)
    if cfg.image_brackets:
      image = jnp.concatenate([self._special(cfg.boi, b), image,
                               self._special(cfg.eoi, b)], axis=1)
      prefix = image
    else:
      prefix = jnp.concatenate([self._special(cfg.bos, b), image], axis=1)
    x = jnp.concatenate([prefix, self.mot.embed(text_bt)], axis=1)
    n_text = prefix.shape[1] - image.shape[1]
    segments = jnp.concatenate([
        jnp.zeros((b, n_text), jnp.int32),
        jnp.full((b, image.shape[1]), IMAGE_SEGMENT, jnp.int32),
        jnp.zeros(text_bt.shape, jnp.int32)], axis=1)
    valid = jnp.concatenate([jnp.ones((b, prefix.shape[1]), bool),
                             text_bt != cfg.pad], axis=1)
    return x, self._positions(valid, segments), segments, valid

  def context_sequence(self, prompt_bp):
    """[bos] [prompt] [boi] ([bos] [prompt] [eos] with image brackets): the
    prefix latents are generated after.

    With image brackets an all-<pad> prompt (the unconditional branch of
    classifier-free guidance) is no context at all, as BAGEL's text-CFG
    branch: the image then starts at position 0 and sees only itself.
    """
    cfg = self.config
    b = prompt_bp.shape[0]
    last = cfg.eos if cfg.image_brackets else cfg.boi
    tokens = jnp.concatenate([
        jnp.full((b, 1), cfg.bos, prompt_bp.dtype), prompt_bp,
        jnp.full((b, 1), last, prompt_bp.dtype)], axis=1)
    valid = tokens != self.config.pad
    if cfg.image_brackets:
      valid &= jnp.any(prompt_bp != cfg.pad, axis=1, keepdims=True)
    return (self.mot.embed(tokens), mot_lib.positions_of(valid),
            jnp.zeros(tokens.shape, jnp.int32), valid)

  def _positions(self, valid_bt, segments_bt):
    shared = self.config.image_positions == 'shared'
    return mot_lib.positions_of(valid_bt, segments_bt if shared else None)

  def latent_step_inputs(self, latents_bhwc, t_b, start_b):
    """A denoising step's tokens after a context, from position `start_b`
    on (all at `start_b` with shared image positions): the latent tokens,
    within [boi] ... [eoi] with image brackets (`config.latent_span`)."""
    cfg = self.config
    x = self.latent_tokens(latents_bhwc, t_b)
    b = x.shape[0]
    if cfg.image_brackets:
      x = jnp.concatenate([self._special(cfg.boi, b), x,
                           self._special(cfg.eoi, b)], axis=1)
    n = x.shape[1]
    step = int(cfg.image_positions == 'sequential')
    positions = start_b[:, None] + step * jnp.arange(n, dtype=jnp.int32)[None]
    return (x, positions, jnp.full((b, n), IMAGE_SEGMENT, jnp.int32),
            jnp.ones((b, n), bool))

  # --- forward passes -------------------------------------------------------

  def understanding_logits(self, pixels_bhwc, text_bt):
    """Next-token logits [B, T_text, V] at the text positions.

    Position i predicts text token i + 1 (the last one predicts <eos> or
    padding); the logit before the first text token is dropped.
    """
    mot_lib.check_tokens(text_bt, self.config.text)
    x, positions, segments, valid = self.understanding_sequence(
        pixels_bhwc, text_bt)
    b, t = x.shape[:2]
    hidden, _ = self.mot(x, positions, segments, valid,
                         mot_lib.init_cache(self.config.text, b, t), 0)
    return self.mot.lm_logits(hidden[:, -text_bt.shape[1]:])

  def prefill_context(self, prompt_bp, extra_slots: int = 0):
    """Prefills [bos] prompt [boi]; returns (cache, context length)."""
    mot_lib.check_tokens(prompt_bp, self.config.text)
    x, positions, segments, valid = self.context_sequence(prompt_bp)
    b, t = x.shape[:2]
    _, cache = self.mot(x, positions, segments, valid,
                        mot_lib.init_cache(self.config.text, b,
                                           t + extra_slots), 0)
    return cache, t

  def velocity_from_cache(self, cache, context_len: int, latents_bhwc, t_b):
    """Velocity [B, h, w, C] of noised latents given a prefilled context.

    The latents are written after the context in a copy of the cache that
    is dropped, so one prefill serves every denoising step.
    """
    # Positions continue after the context's valid tokens (padding does not
    # advance them).
    start = mot_lib.next_position(cache, context_len)
    x, positions, segments, valid = self.latent_step_inputs(
        latents_bhwc, t_b, start)
    span = self.config.latent_span
    hidden, _ = self.mot(x, positions, segments, valid, cache, context_len,
                         gen_span=span)
    return self.velocity(hidden[:, span[0]:span[1]])

  def joint_velocity(self, prompt_bp, latents_bhwc, t_b):
    """Velocity from one forward over the whole sequence [context, latents]
    (no cache reuse): the reference the cached paths are checked against."""
    mot_lib.check_tokens(prompt_bp, self.config.text)
    ctx = self.context_sequence(prompt_bp)
    start = ctx[3].sum(1).astype(jnp.int32)
    lat = self.latent_step_inputs(latents_bhwc, t_b, start)
    x, positions, segments, valid = (jnp.concatenate([a, b], axis=1)
                                     for a, b in zip(ctx, lat))
    b, t = x.shape[:2]
    first = t - lat[0].shape[1]  # The step's tokens come last.
    start, stop = (first + i for i in self.config.latent_span)
    hidden, _ = self.mot(x, positions, segments, valid,
                         mot_lib.init_cache(self.config.text, b, t), 0,
                         gen_span=(start, stop))
    return self.velocity(hidden[:, start:stop])

  def predict_velocity(self, prompt_bp, latents_bhwc, t_b):
    """Velocity of noised latents: the context prefilled, then the latents
    on its cache (the split a group of samples shares a prefix with)."""
    cache, context_len = self.prefill_context(
        prompt_bp, extra_slots=self.config.num_step_tokens)
    return self.velocity_from_cache(cache, context_len, latents_bhwc, t_b)


# --- losses -------------------------------------------------------------------


def text_loss(logits_btv, targets_bt, mask_bt):
  """Token cross-entropy as (sum, count), so accumulation stays exact."""
  logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0]
  mask = mask_bt.astype(jnp.float32)
  return (nll * mask).sum(), mask.sum()


def example_keys(rng, ids_b):
  """One key per example, from the step's key and the example's global id
  [B]: an example draws the same numbers whatever batch row or device it
  lands on, so results do not depend on the device or process count."""
  return jax.vmap(jax.random.fold_in, (None, 0))(rng, ids_b)


def flow_loss(model: UnifiedModel, prompt_bp, latents_bhwc, keys_b):
  """Rectified-flow velocity MSE as (sum, count).

  t ~ U(0, 1) shifted by the config's timestep shift; x_t = (1 - t) x_0 +
  t eps; the target velocity is eps - x_0. Example b draws its t and eps
  from keys_b[b] ([B] keys, e.g. `example_keys`).
  """
  t_keys, eps_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys_b), 1, 0)
  t = shift_time(jax.vmap(jax.random.uniform)(t_keys),
                 model.config.timestep_shift)
  eps = jax.vmap(lambda k: jax.random.normal(
      k, latents_bhwc.shape[1:], latents_bhwc.dtype))(eps_keys)
  tt = t[:, None, None, None]
  x_t = (1.0 - tt) * latents_bhwc + tt * eps
  v = model.predict_velocity(prompt_bp, x_t, t)
  err = (v.astype(jnp.float32) - (eps - latents_bhwc)) ** 2
  return err.sum(), jnp.asarray(err.size, jnp.float32)
