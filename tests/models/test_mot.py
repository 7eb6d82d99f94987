"""The MoT backbone: routing and masks against a brute-force reference,
caching, padding, bad input and Qwen2 parity."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvrpo_jax import metrics
from lvrpo_jax.models import convert
from lvrpo_jax.models import mot
from lvrpo_jax.models import transformer

CFG = transformer.TransformerConfig(
    vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, intermediate_size=48, max_len=32, qk_norm=True)


@pytest.fixture(scope='module')
def model():
  m = mot.MoT(CFG, rngs=nnx.Rngs(0))
  # Make the experts differ a lot, so a routing mistake cannot hide.
  for layer in m.layers:
    for name in ('q', 'k', 'v', 'o', 'gate', 'up', 'down'):
      lin = getattr(layer.gen, name)
      lin.kernel[...] = lin.kernel[...] * 3.0 + 0.01
  return m


def _dense_reference(model, x, positions, segments, valid, is_gen):
  """Both experts on every token, selected per token; the mask built by
  explicit loops over (query, key) from the rules in DESIGN §3."""
  b, t, _ = x.shape
  mask = np.zeros((b, t, t), bool)
  for n in range(b):
    for i in range(t):
      for j in range(t):
        same_image = segments[n, i] == segments[n, j] and segments[n, i] > 0
        mask[n, i, j] = (j <= i or same_image) and valid[n, j]
  pick = lambda g, u: jnp.where(is_gen[..., None], g, u)
  tables = transformer.rope_tables(positions, CFG.head_dim, CFG.rope_theta)
  for layer in model.layers:
    qu, ku, vu = layer.und.qkv(x)
    qg, kg, vg = layer.gen.qkv(x)
    q, k, v = (jnp.where(is_gen[..., None, None], g, u)
               for g, u in ((qg, qu), (kg, ku), (vg, vu)))
    q, k = transformer.rope(q, tables), transformer.rope(k, tables)
    out = transformer.attention(q, k, v, jnp.asarray(mask))
    x = pick(layer.gen.finish(x, out), layer.und.finish(x, out))
  return pick(model.gen_norm(x), model.und_norm(x))


@pytest.mark.parametrize('layout', ['understanding', 'generation', 'text'])
def test_routed_forward_equals_brute_force(model, layout):
  rng = np.random.default_rng(1)
  b, t = 2, 14
  x = jnp.asarray(rng.normal(size=(b, t, CFG.hidden_size)), jnp.float32)
  positions = np.broadcast_to(np.arange(t), (b, t))
  segments = np.zeros((b, t), np.int32)
  valid = np.ones((b, t), bool)
  span = (0, 0)
  if layout == 'understanding':  # [bos] [vit x5] [question ...]
    segments[:, 1:6] = 1
  elif layout == 'generation':  # [bos] [prompt ...] [boi] [latents x6]
    segments[:, 8:14] = 1
    span = (8, 14)
  valid[1, :2] = False  # Row 1 is left-padded.
  is_gen = np.zeros((b, t), bool)
  is_gen[:, span[0]:span[1]] = True
  want = _dense_reference(model, x, positions, segments, valid,
                          jnp.asarray(is_gen))
  got, _ = model(x, jnp.asarray(positions), jnp.asarray(segments),
                 jnp.asarray(valid), mot.init_cache(CFG, b, t), 0, span)
  # Padded query rows attend to nothing valid; compare the real ones.
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid],
                             atol=1e-5, rtol=1e-5)


def test_latents_see_each_other_and_text_does_not_see_the_future(model):
  # Changing the last latent changes the first latent's output (both ways
  # within an image) but no earlier text token's output (causal).
  rng = np.random.default_rng(2)
  b, t, span = 1, 10, (6, 10)
  x = jnp.asarray(rng.normal(size=(b, t, CFG.hidden_size)), jnp.float32)
  segments = jnp.asarray([[0] * 6 + [1] * 4])
  args = (jnp.arange(t)[None], segments, jnp.ones((b, t), bool),
          mot.init_cache(CFG, b, t), 0, span)
  base, _ = model(x, *args)
  moved, _ = model(x.at[0, 9].add(1.0), *args)
  delta = np.abs(np.asarray(moved - base)).max(-1)[0]
  assert (delta[:6] == 0).all() and (delta[6:] > 1e-4).all()


def test_cached_decoding_equals_the_full_sequence(model):
  rng = np.random.default_rng(3)
  b, t, prompt = 2, 12, 5
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, t)))
  want = model.text_logits(tokens)
  zeros, ones = jnp.zeros((b, 1), jnp.int32), jnp.ones((b, 1), bool)
  hidden, cache = model(model.embed(tokens[:, :prompt]),
                        jnp.broadcast_to(jnp.arange(prompt), (b, prompt)),
                        jnp.zeros((b, prompt), jnp.int32),
                        jnp.ones((b, prompt), bool),
                        mot.init_cache(CFG, b, t), 0)
  got = [model.lm_logits(hidden)]
  for i in range(prompt, t):
    hidden, cache = model(model.embed(tokens[:, i:i + 1]),
                          jnp.full((b, 1), i, jnp.int32), zeros, ones, cache,
                          i)
    got.append(model.lm_logits(hidden))
  np.testing.assert_allclose(np.concatenate(got, 1), want, atol=1e-5,
                             rtol=1e-5)


def _scanned_copy(model):
  """The same MoT with scan_layers: its layers' parameters stacked."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  scanned = mot.MoT(dataclasses.replace(CFG, scan_layers=True),
                    rngs=nnx.Rngs(1))
  per_layer = [nnx.to_pure_dict(nnx.state(layer, nnx.Param))
               for layer in model.layers]
  state = nnx.state(scanned.layers, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda *xs: jnp.stack(xs),
                                               *per_layer))
  nnx.update(scanned.layers, state)
  for name in ('embed', 'und_norm', 'gen_norm', 'lm_head'):
    nnx.update(getattr(scanned, name),
               nnx.state(getattr(model, name), nnx.Param))
  return scanned


@pytest.mark.parametrize('layout', ['understanding', 'generation'])
def test_scanned_layers_equal_the_unrolled_ones(model, layout):
  scanned = _scanned_copy(model)
  kernel = scanned.layers.gen.q.kernel
  assert kernel.shape == (CFG.num_layers,) + model.layers[0].gen.q.kernel.shape
  assert kernel.get_metadata()['out_sharding'] == ('layers', 'embed', 'heads')
  rng = np.random.default_rng(6)
  b, t = 2, 10
  x = jnp.asarray(rng.normal(size=(b, t, CFG.hidden_size)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  segments = jnp.zeros((b, t), jnp.int32)
  span = (0, 0) if layout == 'understanding' else (4, 8)
  segments = segments.at[:, span[0]:span[1]].set(1)
  valid = jnp.ones((b, t), bool)
  outs = [m(x, positions, segments, valid, mot.init_cache(CFG, b, t + 2), 0,
            gen_span=span) for m in (model, scanned)]
  np.testing.assert_allclose(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(outs[1][1].k, outs[0][1].k, atol=1e-5)
  # And a cached decoding step after the prefill.
  steps = [m(x[:, :1], jnp.full((b, 1), t), jnp.zeros((b, 1), jnp.int32),
             jnp.ones((b, 1), bool), out[1], t)
           for m, out in zip((model, scanned), outs)]
  np.testing.assert_allclose(steps[1][0], steps[0][0], atol=1e-5, rtol=1e-5)
  # Decoding steps in a jax loop that closes over the model, as the
  # decoders and samplers run it (nnx.scan / nnx.remat inside the model
  # refused that), remat included.
  import dataclasses  # pylint: disable=g-import-not-at-top
  remat = nnx.merge(nnx.graphdef(mot.MoT(dataclasses.replace(
      scanned.config, remat=True, remat_policy='dots'), rngs=nnx.Rngs(3))),
                    nnx.state(scanned))

  def decode(m, cache):
    def step(cache, i):
      hidden, cache = m(x[:, i][:, None], jnp.full((b, 1), t + i),
                        jnp.zeros((b, 1), jnp.int32), jnp.ones((b, 1), bool),
                        cache, t + i)
      return cache, hidden[:, 0]
    return jax.lax.scan(step, cache, jnp.arange(2))[1]

  want = jax.jit(decode)(model, outs[0][1])
  for m in (scanned, remat):
    np.testing.assert_allclose(jax.jit(decode)(m, outs[1][1]), want,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('scan_layers, policy', [
    (False, 'full'), (True, 'full'), (False, 'dots'), (False, 'qkv'),
    (False, 'qkv_attention'), (True, 'qkv_attention')])
def test_remat_changes_memory_not_gradients(model, scan_layers, policy):
  import dataclasses  # pylint: disable=g-import-not-at-top
  base = _scanned_copy(model) if scan_layers else model
  graphdef, state = nnx.split(base)
  remat_graphdef, _ = nnx.split(mot.MoT(dataclasses.replace(
      base.config, remat=True, remat_policy=policy), rngs=nnx.Rngs(2)))
  tokens = jnp.asarray(np.random.default_rng(7).integers(0, CFG.vocab_size,
                                                         (2, 9)))
  loss_of = lambda g: lambda s: nnx.merge(g, s).text_logits(tokens).std()
  plain, remat = (jax.jit(jax.grad(loss_of(g)))(state)
                  for g in (graphdef, remat_graphdef))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               remat, plain)
  # What the backward keeps: less than without remat, more than 'full'
  # with any other policy, and (layers unrolled, where each residual shows
  # its name) exactly what the policy names (transformer.REMAT_POLICIES).
  full_graphdef, _ = nnx.split(mot.MoT(dataclasses.replace(
      base.config, remat=True), rngs=nnx.Rngs(2)))
  kept, kept_full, kept_plain = (
      metrics.saved_residuals(loss_of(g), state)
      for g in (remat_graphdef, full_graphdef, graphdef))
  size = lambda saved: sum(n for n, _ in saved)
  assert size(kept_full) <= size(kept) < size(kept_plain)
  assert (size(kept) > size(kept_full)) == (policy != 'full')
  if scan_layers:
    return
  per_head = CFG.num_layers * tokens.size * CFG.head_dim * 4  # float32.
  named = lambda name: sum(n for n, d in kept if f"named '{name}'" in d)
  assert named('qkv_proj') == (
      per_head * (CFG.num_heads + 2 * CFG.num_kv_heads) if 'qkv' in policy
      else 0)
  assert named('attention') == (per_head * CFG.num_heads
                                if policy == 'qkv_attention' else 0)


def test_left_padding_does_not_change_the_logits(model):
  # RoPE is relative, and padded keys are masked: a left-padded row gives
  # the logits of the unpadded one.
  rng = np.random.default_rng(4)
  tokens = rng.integers(0, CFG.vocab_size, (1, 7))
  want = model.text_logits(jnp.asarray(tokens))
  padded = np.concatenate([np.zeros((1, 3), int), tokens], 1)
  valid = np.arange(10)[None] >= 3
  got = model.text_logits(jnp.asarray(padded), jnp.asarray(valid))
  np.testing.assert_allclose(got[:, 3:], want, atol=1e-5, rtol=1e-5)


def test_jitted_forward_traces_once(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def logits(state, tokens):
    return nnx.merge(graphdef, state).text_logits(tokens)

  tokens = jnp.zeros((2, 8), jnp.int32)
  for offset in range(3):
    logits(state, tokens + offset)


def test_bad_tokens_are_rejected_before_compiling(model):
  with pytest.raises(ValueError, match=r'token ids \[40, 99\] outside'):
    model.text_logits(jnp.asarray([[1, 40, 99]]))
  with pytest.raises(ValueError, match='1 to max_len=32 allowed'):
    model.text_logits(jnp.zeros((1, 33), jnp.int32))
  with pytest.raises(ValueError, match='not a multiple of num_kv_heads=3'):
    transformer.TransformerConfig(40, 32, 1, 4, 3, 8, 48)


@pytest.mark.parametrize('tied', [False, True])
def test_parity_with_transformers_qwen2(tied):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  hf_config = transformers.Qwen2Config(
      vocab_size=64, hidden_size=32, intermediate_size=48,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=64, tie_word_embeddings=tied,
      rope_theta=10_000.0)
  reference = transformers.Qwen2ForCausalLM(hf_config).eval()
  state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
  tokens = np.random.default_rng(0).integers(0, 64, (2, 12))
  with torch.no_grad():
    want = reference(torch.tensor(tokens)).logits.numpy()
  for scan_layers in (False, True):
    model = convert.mot_from_qwen2(state_dict, hf_config.to_dict(),
                                   scan_layers=scan_layers)
    got = np.asarray(model.text_logits(jnp.asarray(tokens)))
    assert np.abs(got - want).max() < 1e-4, scan_layers


def test_a_state_dict_that_does_not_fit_is_listed():
  cfg = {'vocab_size': 40, 'hidden_size': 32, 'num_hidden_layers': 1,
         'num_attention_heads': 4, 'num_key_value_heads': 2,
         'intermediate_size': 48, 'max_position_embeddings': 32}
  state = {'model.embed_tokens.weight': np.zeros((40, 32)),
           'model.norm.weight': np.zeros((31,)),  # Mis-shaped.
           'model.extra.weight': np.zeros(3)}  # Unexpected.
  with pytest.raises(ValueError) as info:
    convert.mot_from_qwen2(state, cfg)
  message = str(info.value)
  assert "unexpected ['model.extra.weight']" in message
  assert 'model.norm.weight -> und_norm.scale: (31,) != (32,)' in message
  assert 'layers.0.und.q.kernel' in message and 'lm_head.kernel' in message
