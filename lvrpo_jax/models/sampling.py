"""Inference: text decoding with a KV cache, and flow-matching image sampling.

Text: a context is prefilled once; `decode` then samples one token per step
with the cache (greedy, temperature, top-k, top-p). Group decoding repeats a
prefilled cache G times along the batch, so G samples of one prompt share one
prefill (`repeat_cache`); every sample draws from its own key, so a group
decodes exactly as its samples would one by one.

Images: `sample_latents` runs the Euler ODE from noise (t = 1) to data
(t = 0) over a shifted schedule. Its velocity comes from a function of
(latents, t); `cached_velocity` prefills the context once (conditional and
unconditional contexts as one batch for classifier-free guidance, which
`Guidance` can limit to an interval of t and renormalize as BAGEL does) and
reuses it at every step, `recomputed_velocity` runs context and latents as one
sequence every step (the reference the cached path is tested and benchmarked
against).

Shapes: B batch, G group, T new tokens, V vocab, h x w x C latent.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from lvrpo_jax.models import mot as mot_lib
from lvrpo_jax.models import unified
from lvrpo_jax.models import vae
from lvrpo_jax.world import tokenizer as tok


@dataclasses.dataclass(frozen=True)
class TextSampling:
  """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f'bad sampling settings {self}: need temperature >= '
                       '0, top_k >= 0, 0 < top_p <= 1')


def filter_logits(logits_bv, settings: TextSampling):
  """Temperature, then top-k, then top-p (nucleus) masking; [B, V]."""
  logits = logits_bv.astype(jnp.float32) / max(settings.temperature, 1e-6)
  if settings.top_k:
    kth = jax.lax.top_k(logits, settings.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if settings.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass before it is below top_p (the first always).
    keep_sorted = jnp.cumsum(probs, axis=-1) - probs < settings.top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def sample_token(logits_bv, keys_b, settings: TextSampling):
  """One token per row [B] and its log-prob.

  The log-prob is under the distribution sampled from (temperature, top-k,
  top-p applied); for greedy decoding (temperature 0), whose distribution is
  a point mass, it is under the model's own distribution.

  Args:
    keys_b: one PRNG key per row, so rows are independent of the batch.
  """
  if settings.temperature == 0:
    token = jnp.argmax(logits_bv, axis=-1)
    logits = logits_bv.astype(jnp.float32)
  else:
    logits = filter_logits(logits_bv, settings)
    token = jax.vmap(jax.random.categorical)(keys_b, logits)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def repeat_cache(cache: mot_lib.Cache, group: int) -> mot_lib.Cache:
  """Each row's cache G times: rows b*G .. b*G + G - 1 share prompt b."""
  rep = lambda x, axis: jnp.repeat(x, group, axis=axis)
  return mot_lib.Cache(rep(cache.k, 1), rep(cache.v, 1),
                       rep(cache.positions, 0), rep(cache.segments, 0),
                       rep(cache.valid, 0))


def decode(model: mot_lib.MoT, cache: mot_lib.Cache, context_len: int,
           last_logits_bv, keys_b, num_tokens: int,
           settings: TextSampling, eos: int = tok.EOS, pad: int = tok.PAD,
           keep_ids=None):
  """Samples `num_tokens` tokens after a prefilled context.

  Args:
    cache: holds the context in slots [0, context_len) and room for
      `num_tokens` more.
    last_logits_bv: logits at the context's last token.
    keys_b: one key per row; step i uses fold_in(key, i).
    keep_ids: token ids [K] whose logits to return at every step, or None.

  Returns:
    (tokens [B, T], log-probs [B, T], done mask [B, T] True from <eos> on;
    tokens after <eos> are `pad` with log-prob 0), and with `keep_ids` the
    logits [B, T, K] each token was drawn from, at those ids.
  """
  if cache.k.shape[2] < context_len + num_tokens:
    raise ValueError(f'cache of {cache.k.shape[2]} slots cannot hold '
                     f'{context_len} + {num_tokens} tokens')
  b = last_logits_bv.shape[0]
  next_pos = mot_lib.next_position(cache, context_len)

  def step(carry, i):
    cache, logits, pos, finished = carry
    keys = jax.vmap(jax.random.fold_in, (0, None))(keys_b, i)
    token, logp = sample_token(logits, keys, settings)
    token = jnp.where(finished, pad, token)
    logp = jnp.where(finished, 0.0, logp)
    hidden, cache = model(model.embed(token[:, None]), pos[:, None],
                          jnp.zeros((b, 1), jnp.int32), ~finished[:, None],
                          cache, context_len + i)
    finished_now = finished | (token == eos)
    kept = () if keep_ids is None else logits[:, keep]
    return ((cache, model.lm_logits(hidden)[:, 0], pos + 1, finished_now),
            (token, logp, finished, kept))

  keep = None if keep_ids is None else jnp.asarray(keep_ids, jnp.int32)
  init = (cache, last_logits_bv, next_pos, jnp.zeros((b,), bool))
  _, (tokens, logps, was_done, kept) = jax.lax.scan(step, init,
                                                    jnp.arange(num_tokens))
  out = tokens.T, logps.T, was_done.T
  return out if keep_ids is None else (*out, kept.transpose(1, 0, 2))


def greedy_answers(model: unified.UnifiedModel, pixels_bhwc, questions_bq,
                   num_tokens: int):
  """Greedy answers to questions about images (the understanding path).

  The understanding sequence [bos] [vit] [question] is prefilled once, then
  `decode` picks the most likely token `num_tokens` times. Pure and not
  jitted, so a caller jits it once around its own frozen parameters.

  Args:
    model: the unified model (e.g. a frozen judge).
    pixels_bhwc: [B, H, W, 3] pixels in [-1, 1].
    questions_bq: int [B, Q] question ids, left-padded with <pad> so every
      answer starts right after its question.
    num_tokens: answer tokens to decode (for the world, a rationale, one
      word and <eos> at most).

  Returns:
    tokens [B, num_tokens]; after <eos>, <pad>.
  """
  return greedy_answers_and_logits(model, pixels_bhwc, questions_bq,
                                   num_tokens, ())[0]


def greedy_answers_and_logits(model: unified.UnifiedModel, pixels_bhwc,
                              questions_bq, num_tokens: int, keep_ids):
  """`greedy_answers` and the logits at `keep_ids` [K] that each answer
  token was chosen from: (tokens [B, num_tokens], logits [B, num_tokens,
  K])."""
  x, positions, segments, valid = model.understanding_sequence(pixels_bhwc,
                                                               questions_bq)
  b, t = x.shape[:2]
  hidden, cache = model.mot(x, positions, segments, valid,
                            mot_lib.init_cache(model.config.text, b,
                                               t + num_tokens), 0)
  first_logits = model.mot.lm_logits(hidden)[:, -1]
  # Greedy decoding draws nothing; `decode` still takes one key per row.
  tokens, _, _, kept = decode(model.mot, cache, t, first_logits,
                              jax.random.split(jax.random.key(0), b),
                              num_tokens, TextSampling(0.0),
                              keep_ids=keep_ids)
  return tokens, kept


def shifted_times(num_steps: int, shift: float):
  """The Euler schedule t_0 = 1 > ... > t_n = 0, shifted; [n + 1]."""
  return unified.shift_time(jnp.linspace(1.0, 0.0, num_steps + 1), shift)


def sample_latents(velocity_fn: Callable, noise_bhwc, num_steps: int,
                   shift: float):
  """Euler ODE from noise (t = 1) to latents (t = 0).

  Args:
    velocity_fn: (latents [B, h, w, C], t [B]) -> velocity.
  """
  times = shifted_times(num_steps, shift)
  b = noise_bhwc.shape[0]

  def step(i, x):
    t, t_next = times[i], times[i + 1]
    v = velocity_fn(x, jnp.full((b,), t))
    return x + (t_next - t) * v

  return jax.lax.fori_loop(0, num_steps, step, noise_bhwc)


@dataclasses.dataclass(frozen=True)
class Guidance:
  """Classifier-free guidance, as BAGEL samples.

  v = v_u + scale (v_c - v_u) at the steps whose t lies in
  (interval[0], interval[1]], else v_c. With `renorm_min`, a guided
  velocity is then rescaled to at most the conditional one's norm, over
  all of a sample's latents: v * clip(|v_c| / |v|, renorm_min, 1)
  (BAGEL's 'global' cfg_renorm). A plain float is Guidance(scale).
  """
  scale: float = 1.0
  interval: tuple[float, float] = (0.0, 1.0)
  renorm_min: float | None = None

  def __post_init__(self):
    lo, hi = self.interval
    if self.scale < 0 or not 0 <= lo < hi <= 1 or not (
        self.renorm_min is None or 0 <= self.renorm_min <= 1):
      raise ValueError(f'bad guidance {self}: need scale >= 0, '
                       '0 <= interval[0] < interval[1] <= 1 and renorm_min '
                       'None or in [0, 1]')


def as_guidance(guidance) -> Guidance:
  """A Guidance, from itself or a plain scale."""
  return guidance if isinstance(guidance, Guidance) else Guidance(
      float(guidance))


def guide(v_cond, v_uncond, t_b, guidance: Guidance):
  """The guided velocity [B, ...] (e.g. [B, h, w, C]) at times t_b [B]."""
  lo, hi = guidance.interval
  rest = tuple(range(1, v_cond.ndim))
  on = jnp.expand_dims((t_b > lo) & (t_b <= hi), rest)
  v = v_uncond + jnp.where(on, guidance.scale, 1.0) * (v_cond - v_uncond)
  if guidance.renorm_min is None:
    return v
  norm = lambda x: jnp.sqrt(jnp.sum(x * x, axis=rest, keepdims=True))
  ratio = jnp.clip(norm(v_cond) / (norm(v) + 1e-8), guidance.renorm_min, 1.0)
  return jnp.where(on, v * ratio, v)


def _with_unconditional(prompt_bp, pad: int, guidance: Guidance):
  """[cond; uncond] prompts (uncond = all padding) when guiding."""
  if guidance.scale == 1.0:
    return prompt_bp
  return jnp.concatenate([prompt_bp, jnp.full_like(prompt_bp, pad)])


def cached_velocity(model: unified.UnifiedModel, prompt_bp,
                    guidance: float | Guidance = 1.0):
  """velocity_fn with the context prefilled once for all steps."""
  guidance = as_guidance(guidance)
  prompts = _with_unconditional(prompt_bp, model.config.pad, guidance)
  cache, context_len = model.prefill_context(
      prompts, extra_slots=model.config.num_step_tokens)
  reps = prompts.shape[0] // prompt_bp.shape[0]

  def velocity_fn(x, t):
    v = model.velocity_from_cache(cache, context_len, jnp.tile(x, (reps, 1,
                                                                  1, 1)),
                                  jnp.tile(t, reps))
    return v if reps == 1 else guide(*jnp.split(v, 2), t, guidance)

  return velocity_fn


def recomputed_velocity(model: unified.UnifiedModel, prompt_bp,
                        guidance: float | Guidance = 1.0):
  """velocity_fn running the whole sequence at every step (the reference:
  one joint forward, so the context is really recomputed)."""
  guidance = as_guidance(guidance)
  prompts = _with_unconditional(prompt_bp, model.config.pad, guidance)
  reps = prompts.shape[0] // prompt_bp.shape[0]

  def velocity_fn(x, t):
    v = model.joint_velocity(prompts, jnp.tile(x, (reps, 1, 1, 1)),
                             jnp.tile(t, reps))
    return v if reps == 1 else guide(*jnp.split(v, 2), t, guidance)

  return velocity_fn


def generate_latents(model: unified.UnifiedModel, prompt_bp, rng,
                     num_steps: int, guidance: float | Guidance = 1.0):
  """Latents [B, h, w, C] for prompts, with one shared context prefill."""
  cfg = model.config
  noise = jax.random.normal(rng, (prompt_bp.shape[0], cfg.latent_size,
                                  cfg.latent_size, cfg.latent_channels))
  return sample_latents(cached_velocity(model, prompt_bp, guidance), noise,
                        num_steps, cfg.timestep_shift)


def generate_images(model: unified.UnifiedModel, autoencoder, prompt_bp, rng,
                    num_steps: int, guidance: float | Guidance = 1.0):
  """uint8 images [B, H, W, 3] for prompts: latents sampled with the cached
  context, un-normalized, decoded by the (frozen) autoencoder."""
  latents = generate_latents(model, prompt_bp, rng, num_steps, guidance)
  pixels = autoencoder.decode(autoencoder.denormalize_latents(latents))
  return vae.to_uint8(pixels)
