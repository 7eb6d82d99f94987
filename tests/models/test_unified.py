"""The unified model and inference: caching and grouping equal their
references, the losses equal hand-computed numbers."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvrpo_jax.models import mot
from lvrpo_jax.models import presets
from lvrpo_jax.models import sampling
from lvrpo_jax.models import unified
from lvrpo_jax.models import vae
from lvrpo_jax.world import tokenizer as tok

V = tok.Tokenizer().vocab_size
CFG = presets.micro()


@pytest.fixture(scope='module')
def model():
  m = unified.UnifiedModel(CFG, rngs=nnx.Rngs(0))
  # A non-zero velocity head, so sampling paths have something to differ on.
  head = m.velocity_out
  head.kernel[...] = jax.random.normal(jax.random.key(1),
                                       head.kernel.shape) * 0.1
  return m


def _prompts(rng, b=2, p=6):
  prompts = rng.integers(len(tok.SPECIALS), V, (b, p))
  prompts[1, :2] = tok.PAD  # Left-padded.
  return jnp.asarray(prompts, jnp.int32)


def test_shapes(model):
  rng = np.random.default_rng(0)
  pixels = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  text = jnp.asarray(rng.integers(6, V, (2, 7)), jnp.int32)
  assert model.understanding_logits(pixels, text).shape == (2, 7, V)
  latents = jnp.zeros((2, 4, 4, 4))
  v = model.predict_velocity(_prompts(rng), latents, jnp.array([0.5, 0.1]))
  assert v.shape == (2, 4, 4, 4)


def test_sincos_2d_by_hand():
  # dim 4: one frequency (1) per axis; [sin y, cos y, sin x, cos x] of the
  # row-major 2 x 2 grid.
  s, c = np.sin(1.0), np.cos(1.0)
  np.testing.assert_allclose(unified.sincos_2d(2, 4), [
      [0, 1, 0, 1], [0, 1, s, c], [s, c, 0, 1], [s, c, s, c]], atol=1e-6)


def test_vit_pos_embed_adds_the_patch_grid_embedding(model):
  pixels = jnp.asarray(np.random.default_rng(0).uniform(
      -1, 1, (2, 32, 32, 3)), jnp.float32)
  without = unified.UnifiedModel(
      dataclasses.replace(CFG, vit_pos_embed=False), rngs=nnx.Rngs(1))
  nnx.update(without, nnx.state(model))  # The same parameters.
  grid = CFG.vit.image_size // CFG.vit.patch_size
  np.testing.assert_allclose(
      model.vit_tokens(pixels) - without.vit_tokens(pixels),
      np.broadcast_to(unified.sincos_2d(grid, CFG.text.hidden_size),
                      (2, grid * grid, CFG.text.hidden_size)), atol=1e-5)


@pytest.mark.parametrize('guidance', [1.0, 3.0])
def test_cached_sampling_equals_recomputing_the_context(model, guidance):
  prompts = _prompts(np.random.default_rng(1))
  noise = jax.random.normal(jax.random.key(2), (2, 4, 4, 4))
  cached = sampling.sample_latents(
      sampling.cached_velocity(model, prompts, guidance), noise, 4, 2.0)
  recomputed = sampling.sample_latents(
      sampling.recomputed_velocity(model, prompts, guidance), noise, 4, 2.0)
  np.testing.assert_allclose(cached, recomputed, atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(cached - noise)).max() > 1e-3  # It moved.


def test_guidance_interval_and_renorm_by_hand():
  # cond (3, 4) has norm 5; uncond 0; scale 2 gives (6, 8), norm 10.
  cond = jnp.array([3.0, 4.0]).reshape(1, 1, 1, 2)
  uncond = jnp.zeros_like(cond)
  at = lambda t: jnp.array([t])
  guide = lambda g, t=0.5: sampling.guide(cond, uncond, at(t), g).ravel()
  np.testing.assert_allclose(guide(sampling.Guidance(2.0)), [6, 8])
  # Renormalized to at most the conditional norm: ratio 0.5, or its floor.
  np.testing.assert_allclose(
      guide(sampling.Guidance(2.0, renorm_min=0.0)), [3, 4], rtol=1e-6)
  np.testing.assert_allclose(
      guide(sampling.Guidance(2.0, renorm_min=0.8)), [4.8, 6.4], rtol=1e-6)
  # Outside (0.4, 1]: the conditional velocity, not renormalized.
  g = sampling.Guidance(2.0, interval=(0.4, 1.0), renorm_min=0.8)
  np.testing.assert_allclose(guide(g, t=0.4), [3, 4])
  np.testing.assert_allclose(guide(g, t=1.0), [4.8, 6.4], rtol=1e-6)
  with pytest.raises(ValueError, match='bad guidance'):
    sampling.Guidance(2.0, interval=(0.5, 0.4))


def test_cached_sampling_with_bagel_guidance_equals_recomputing(model):
  prompts = _prompts(np.random.default_rng(1))
  noise = jax.random.normal(jax.random.key(2), (2, 4, 4, 4))
  g = sampling.Guidance(3.0, interval=(0.4, 1.0), renorm_min=0.0)
  cached, recomputed, plain = (sampling.sample_latents(
      velocity(model, prompts, guidance), noise, 4, 2.0)
      for velocity, guidance in ((sampling.cached_velocity, g),
                                 (sampling.recomputed_velocity, g),
                                 (sampling.cached_velocity, 3.0)))
  np.testing.assert_allclose(cached, recomputed, atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(cached - plain)).max() > 1e-3


def test_prompt_padding_does_not_change_the_velocity(model):
  rng = np.random.default_rng(3)
  prompt = jnp.asarray(rng.integers(6, V, (1, 4)), jnp.int32)
  padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), prompt], 1)
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 4))
  t = jnp.array([0.7])
  np.testing.assert_allclose(model.predict_velocity(prompt, x, t),
                             model.predict_velocity(padded, x, t),
                             atol=1e-5, rtol=1e-5)


def _prefill_text(model, prompts, extra):
  b, p = prompts.shape
  valid = prompts != tok.PAD
  hidden, cache = model.mot(
      model.mot.embed(prompts), mot.positions_of(valid),
      jnp.zeros((b, p), jnp.int32), valid,
      mot.init_cache(CFG.text, b, p + extra), 0)
  return cache, model.mot.lm_logits(hidden)[:, -1]


def test_group_decoding_equals_decoding_each_sample(model):
  prompts = _prompts(np.random.default_rng(4))
  group, steps = 3, 5
  settings = sampling.TextSampling(temperature=1.0, top_k=10)
  keys = jax.random.split(jax.random.key(7), 2 * group)
  cache, last = _prefill_text(model, prompts, steps)
  grouped = sampling.decode(model.mot, sampling.repeat_cache(cache, group),
                            prompts.shape[1], jnp.repeat(last, group, 0),
                            keys, steps, settings)
  for row in range(2 * group):
    one = prompts[row // group][None]
    cache1, last1 = _prefill_text(model, one, steps)
    single = sampling.decode(model.mot, cache1, one.shape[1], last1,
                             keys[row][None], steps, settings)
    np.testing.assert_array_equal(grouped[0][row], single[0][0])
    np.testing.assert_allclose(grouped[1][row], single[1][0], atol=1e-5)


def test_greedy_decoding_follows_the_full_sequence_argmax(model):
  prompts = _prompts(np.random.default_rng(5))[:1, 2:]  # One, unpadded.
  steps = 4
  cache, last = _prefill_text(model, prompts, steps)
  keep = np.array([7, tok.EOS, 3])
  tokens, logps, _, kept = sampling.decode(
      model.mot, cache, prompts.shape[1], last, jax.random.split(
          jax.random.key(0), 1), steps, sampling.TextSampling(0.0),
      eos=-1, keep_ids=keep)  # No early stop: compare every step.
  # One uncached pass over prompt + decoded tokens: each decoded token is the
  # argmax of the full-sequence logits before it, with that log-prob.
  p = prompts.shape[1]
  logits = model.mot.text_logits(jnp.concatenate([prompts, tokens], 1))[
      0, p - 1:-1]
  logp = jax.nn.log_softmax(logits)
  np.testing.assert_array_equal(tokens[0], jnp.argmax(logp, -1))
  np.testing.assert_allclose(logps[0], logp[jnp.arange(steps), tokens[0]],
                             atol=1e-5)
  # The kept logits are those each token was drawn from, at `keep`.
  assert kept.shape == (1, steps, len(keep))
  np.testing.assert_allclose(kept[0], logits[:, keep], atol=1e-4)


def test_decoding_stops_at_eos():
  logits = jnp.full((1, V), -10.0).at[0, tok.EOS].set(10.0)
  # A one-token "model" would be heavy; check the filter + sampler instead.
  token, logp = sampling.sample_token(logits, jax.random.split(
      jax.random.key(0), 1), sampling.TextSampling(0.0))
  assert int(token[0]) == tok.EOS and float(logp[0]) <= 0


def test_top_k_and_top_p_by_hand():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keep = lambda s: np.isfinite(np.asarray(sampling.filter_logits(logits, s)))
  assert keep(sampling.TextSampling(top_k=2)).tolist() == [[1, 1, 0, 0]]
  # Mass before each token: 0, .5, .8, .95 -> top_p = .8 keeps the first two.
  assert keep(sampling.TextSampling(top_p=0.8)).tolist() == [[1, 1, 0, 0]]
  assert keep(sampling.TextSampling(top_p=0.81)).tolist() == [[1, 1, 1, 0]]
  with pytest.raises(ValueError, match='top_p'):
    sampling.TextSampling(top_p=0.0)


def test_text_loss_by_hand():
  logits = jnp.log(jnp.array([[[0.25, 0.75], [0.5, 0.5], [0.9, 0.1]]]))
  total, count = unified.text_loss(logits, jnp.array([[1, 0, 0]]),
                                   jnp.array([[1, 1, 0]]))
  assert float(total) == pytest.approx(-np.log(0.75) - np.log(0.5))
  assert float(count) == 2


def test_flow_loss_matches_its_formula():
  # With a zero velocity head the model predicts v = 0, so the loss is the
  # sum of (eps - x0)^2 with the same draws of t and eps.
  m = unified.UnifiedModel(CFG, rngs=nnx.Rngs(0))
  x0 = jax.random.normal(jax.random.key(3), (2, 4, 4, 4))
  keys = jax.random.split(jax.random.key(4), 2)
  total, count = unified.flow_loss(m, _prompts(np.random.default_rng(0)), x0,
                                   keys)
  # Example b draws eps from the second half of split(keys[b]).
  eps = jnp.stack([jax.random.normal(jax.random.split(k)[1], x0.shape[1:])
                   for k in keys])
  assert float(total) == pytest.approx(float(((eps - x0) ** 2).sum()),
                                       rel=1e-5)
  assert float(count) == x0.size


def test_shifted_schedule():
  times = sampling.shifted_times(4, 3.0)
  # t' = 3t / (1 + 2t) at t = 1, .75, .5, .25, 0.
  np.testing.assert_allclose(times, [1.0, 0.9, 0.75, 0.5, 0.0], atol=1e-6)


def test_jitted_sampling_traces_once(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def generate(state, prompts, rng):
    return sampling.generate_latents(nnx.merge(graphdef, state), prompts,
                                     rng, num_steps=2, guidance=2.0)

  prompts = _prompts(np.random.default_rng(6))
  for seed in range(3):
    generate(state, prompts, jax.random.key(seed))


def test_jitted_group_decoding_traces_once(model):
  graphdef, state = nnx.split(model)
  settings = sampling.TextSampling(temperature=0.7, top_p=0.9)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def group_decode(state, prompts, keys):
    m = nnx.merge(graphdef, state)
    cache, last = _prefill_text(m, prompts, 3)
    return sampling.decode(m.mot, sampling.repeat_cache(cache, 4),
                           prompts.shape[1], jnp.repeat(last, 4, 0), keys, 3,
                           settings)

  prompts = _prompts(np.random.default_rng(8))
  for seed in range(3):
    group_decode(state, prompts, jax.random.split(jax.random.key(seed), 8))


def test_generate_images_decodes_to_uint8(model):
  ae_cfg = vae.tiny()
  ae = vae.LightAutoencoder(ae_cfg, rngs=nnx.Rngs(0))
  cfg = unified.UnifiedConfig(CFG.text, CFG.vit, ae_cfg.latent_channels, 4)
  m = unified.UnifiedModel(cfg, rngs=nnx.Rngs(1))
  images = sampling.generate_images(m, ae, _prompts(np.random.default_rng(0)),
                                    jax.random.key(0), num_steps=2)
  assert images.dtype == jnp.uint8 and images.shape == (2, 32, 32, 3)


def test_bad_prompt_tokens_are_rejected(model):
  with pytest.raises(ValueError, match='outside the vocabulary'):
    model.prefill_context(jnp.array([[V + 3]]))
  with pytest.raises(ValueError, match='multiple of latent_patch'):
    unified.UnifiedConfig(CFG.text, CFG.vit, 4, 5, 2)


def test_bfloat16_compute_keeps_float32_parameters(model):
  """Mixed precision: the same float32 parameters, bf16 activations (the
  cache too), outputs within bf16 rounding of the float32 model's."""
  half = unified.UnifiedModel(presets.with_dtype(CFG, 'bfloat16'),
                              rngs=nnx.Rngs(0))
  nnx.update(half, nnx.state(model, nnx.Param))
  assert {x.dtype for x in jax.tree.leaves(nnx.state(half, nnx.Param))} == {
      jnp.dtype(jnp.float32)}
  rng = np.random.default_rng(0)
  pixels = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  text = jnp.asarray(rng.integers(len(tok.SPECIALS), V, (2, 6)), jnp.int32)
  latents = jnp.asarray(rng.normal(size=(2, 4, 4, 4)), jnp.float32)
  t = jnp.array([0.3, 0.8])
  cache, _ = jax.jit(lambda m: m.prefill_context(text))(half)
  assert cache.k.dtype == jnp.bfloat16
  for fn in (jax.jit(lambda m: m.understanding_logits(pixels, text)),
             jax.jit(lambda m: m.predict_velocity(text, latents, t))):
    full, low = fn(model), fn(half)
    assert low.dtype == jnp.bfloat16
    err = np.abs(np.asarray(low, np.float32) - np.asarray(full)).max()
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per op); a few
    # layers of it stay within a few percent of the output's scale, and
    # the difference is not zero (the matmuls really ran in bf16).
    assert 0 < err < 0.03 * np.abs(np.asarray(full)).max(), err
  keys = unified.example_keys(jax.random.key(0), jnp.arange(2))
  loss = jax.jit(lambda m: unified.flow_loss(m, text, latents, keys))
  full, count = loss(model)
  low, _ = loss(half)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low / count, full / count, rtol=1e-2)
