"""BAGEL import: its conventions by hand, its names, and parity with BAGEL.

The parity test runs BAGEL's own torch model (`bagel_reference.py`) in a
subprocess. It needs a BAGEL checkout and the transformers BAGEL pins:

  LVRPO_BAGEL_SRC=/path/to/Bagel \
  LVRPO_BAGEL_PYTHONPATH=/path/to/site-with-transformers-4.49 pytest ...

and is skipped without LVRPO_BAGEL_SRC.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvrpo_jax import sharding

from lvrpo_jax.models import convert
from lvrpo_jax.models import convert_bagel
from lvrpo_jax.models import mot as mot_lib
from lvrpo_jax.models import presets
from lvrpo_jax.models import sampling
from lvrpo_jax.models import unified
from lvrpo_jax.rl import rollout
from tests.models import test_siglip

D, VOCAB, FFN, VIT_D, VIT_FFN = 8, 16, 12, 4, 6

CONFIG = dict(
    llm_config=dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN,
                    num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=32,
                    rope_theta=10_000.0, qk_norm=True,
                    tie_word_embeddings=False,
                    layer_module='Qwen2MoTDecoderLayer'),
    vit_config=dict(hidden_size=VIT_D, intermediate_size=VIT_FFN,
                    num_hidden_layers=1, num_attention_heads=2, image_size=4,
                    patch_size=2, hidden_act='gelu_pytorch_tanh', rope=False),
    vae_config=dict(z_channels=2, downsample=2),
    latent_patch_size=2, max_latent_size=3, vit_max_num_patch_per_side=2,
    connector_act='gelu_pytorch_tanh', interpolate_pos=False,
    timestep_shift=3.0)
TOKEN_IDS = dict(bos_token_id=1, eos_token_id=2, start_of_image=3,
                 end_of_image=4, pad_token_id=0)


def _table(max_side, dim):
  """BAGEL's `get_2d_sincos_pos_embed` written out: for the flat index
  i = h * max_side + w, [sin(w f), cos(w f), sin(h f), cos(h f)]."""
  f = 1.0 / 10_000 ** (np.arange(dim // 4) / (dim // 4))
  h, w = np.divmod(np.arange(max_side * max_side), max_side)
  return np.concatenate([np.sin(w[:, None] * f), np.cos(w[:, None] * f),
                         np.sin(h[:, None] * f), np.cos(h[:, None] * f)], 1)


def _bagel_state_dict():
  """BAGEL's parameter names and shapes for CONFIG, as its modules define
  them (qwen2_navit.py, siglip_navit.py, bagel.py), filled with distinct
  random values."""
  rng = np.random.default_rng(0)
  kv, lat = D // 2, 2 * 2 * 2  # One kv head of dim 4; p * p * z_channels.
  shapes = {
      'language_model.model.embed_tokens.weight': (VOCAB, D),
      'language_model.model.norm.weight': (D,),
      'language_model.model.norm_moe_gen.weight': (D,),
      'language_model.lm_head.weight': (VOCAB, D),
      'time_embedder.mlp.0.weight': (D, 256), 'time_embedder.mlp.0.bias': (D,),
      'time_embedder.mlp.2.weight': (D, D), 'time_embedder.mlp.2.bias': (D,),
      'vae2llm.weight': (D, lat), 'vae2llm.bias': (D,),
      'llm2vae.weight': (lat, D), 'llm2vae.bias': (lat,),
      'connector.fc1.weight': (D, VIT_D), 'connector.fc1.bias': (D,),
      'connector.fc2.weight': (D, D), 'connector.fc2.bias': (D,),
  }
  for sfx in ('', '_moe_gen'):
    layer = 'language_model.model.layers.0.'
    shapes.update({
        f'{layer}input_layernorm{sfx}.weight': (D,),
        f'{layer}post_attention_layernorm{sfx}.weight': (D,),
        f'{layer}self_attn.q_proj{sfx}.weight': (D, D),
        f'{layer}self_attn.q_proj{sfx}.bias': (D,),
        f'{layer}self_attn.k_proj{sfx}.weight': (kv, D),
        f'{layer}self_attn.k_proj{sfx}.bias': (kv,),
        f'{layer}self_attn.v_proj{sfx}.weight': (kv, D),
        f'{layer}self_attn.v_proj{sfx}.bias': (kv,),
        f'{layer}self_attn.o_proj{sfx}.weight': (D, D),
        f'{layer}self_attn.q_norm{sfx}.weight': (D // 2,),
        f'{layer}self_attn.k_norm{sfx}.weight': (D // 2,),
        f'{layer}mlp{sfx}.gate_proj.weight': (FFN, D),
        f'{layer}mlp{sfx}.up_proj.weight': (FFN, D),
        f'{layer}mlp{sfx}.down_proj.weight': (D, FFN)})
  # BAGEL's ViT is SigLIP's vision model under 'vit_model.', its patch
  # embedding in BAGEL's linear form.
  vit = test_siglip._hf_vision_shapes(d=VIT_D, f=VIT_FFN, layers=1, p=2,
                                      n=4, head=False)
  vit['embeddings.patch_embedding.weight'] = (VIT_D, 3 * 2 * 2)
  shapes.update({f'vit_model.vision_model.{k}': v for k, v in vit.items()})
  state = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  state['vit_pos_embed.pos_embed'] = _table(2, D).astype(np.float32)
  state['latent_pos_embed.pos_embed'] = _table(3, D).astype(np.float32)
  return state


def test_shared_image_positions_by_hand():
  # [bos] [img img img] [t] [pad] [img img] [t]: each image one position.
  segments = jnp.array([[0, 1, 1, 1, 0, 0, 2, 2, 0]])
  valid = jnp.array([[1, 1, 1, 1, 1, 0, 1, 1, 1]], bool)
  assert mot_lib.positions_of(valid, segments).tolist() == [
      [0, 1, 1, 1, 2, 2, 3, 3, 4]]
  assert mot_lib.positions_of(valid).tolist() == [[0, 1, 2, 3, 4, 4, 5, 6, 7]]
  # Two images back to back keep their own positions.
  assert mot_lib.positions_of(jnp.ones((1, 4), bool), jnp.array(
      [[1, 1, 2, 2]])).tolist() == [[0, 0, 1, 1]]


def test_next_position_after_shared_and_sequential_contexts():
  cache = mot_lib.Cache(
      k=None, v=None, positions=jnp.array([[0, 1, 1, 1, 2, 0],
                                           [0, 1, 2, 3, 4, 0]]),
      segments=None, valid=jnp.array([[1, 1, 1, 1, 1, 0],
                                      [0, 1, 1, 1, 1, 0]], bool))
  assert mot_lib.next_position(cache, 5).tolist() == [3, 5]
  assert mot_lib.next_position(cache, 3).tolist() == [2, 3]


def test_sincos_w_first_is_bagels_table():
  # Exact grid: BAGEL's extrapolated ids h * max + w on a larger table.
  np.testing.assert_allclose(unified.sincos_2d(2, 8, w_first=True),
                             _table(3, 8)[[0, 1, 3, 4]], atol=1e-6)
  np.testing.assert_allclose(unified.sincos_2d(2, 8), np.concatenate(
      [_table(2, 8)[:, 4:], _table(2, 8)[:, :4]], 1), atol=1e-6)


def test_timestep_embedding_scale_by_hand():
  # dim 4: frequencies 1 and 1e-2; [cos, cos, sin, sin].
  t = jnp.array([0.5])
  np.testing.assert_allclose(
      unified.timestep_embedding(t, 4, scale=1.0),
      [[np.cos(0.5), np.cos(0.005), np.sin(0.5), np.sin(0.005)]], rtol=1e-6)
  np.testing.assert_allclose(unified.timestep_embedding(t, 4),
                             unified.timestep_embedding(1000 * t, 4, 1.0),
                             rtol=1e-6)


def test_shared_layouts_give_each_image_one_position():
  cfg = presets.micro()
  import dataclasses  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  shared = dataclasses.replace(cfg, image_positions='shared')
  model = unified.UnifiedModel(shared, rngs=nnx.Rngs(0))
  text = jnp.array([[7, 8, cfg.pad]])
  _, positions, _, _ = model.understanding_sequence(
      jnp.zeros((1, 32, 32, 3)), text)
  nv = (32 // 8) ** 2
  assert positions.tolist() == [[0] + [1] * nv + [2, 3, 3]]
  _, positions, _, _ = model.latent_step_inputs(
      jnp.zeros((1, 4, 4, 4)), jnp.ones((1,)), jnp.array([5]))
  assert positions.tolist() == [[5] * 16]
  # BAGEL's template: [boi vit eoi] at one position, then the text; a step
  # is [boi latents eoi], the latents routed to `gen` (latent_span).
  bagel = dataclasses.replace(shared, image_brackets=True)
  model = unified.UnifiedModel(bagel, rngs=nnx.Rngs(0))
  x, positions, segments, _ = model.understanding_sequence(
      jnp.zeros((1, 32, 32, 3)), text)
  assert positions.tolist() == [[0] * (nv + 2) + [1, 2, 2]]
  assert segments.tolist() == [[1] * (nv + 2) + [0, 0, 0]]
  np.testing.assert_array_equal(x[0, 0], model.mot.embed.embedding[cfg.boi])
  np.testing.assert_array_equal(x[0, nv + 1],
                                model.mot.embed.embedding[cfg.eoi])
  x, positions, _, _ = model.latent_step_inputs(
      jnp.zeros((1, 4, 4, 4)), jnp.ones((1,)), jnp.array([5]))
  assert x.shape[1] == bagel.num_step_tokens == 18
  assert bagel.latent_span == (1, 17) and positions.tolist() == [[5] * 18]
  ctx = model.context_sequence(jnp.array([[9, 10]]))
  np.testing.assert_array_equal(ctx[0][0, -1], model.mot.embed.embedding[
      cfg.eos])
  # An all-<pad> prompt (CFG's unconditional branch) is an empty context,
  # as BAGEL's text-CFG branch: the step sits at position 0 and sees only
  # itself.
  empty = jnp.full((1, 2), cfg.pad)
  assert not model.context_sequence(empty)[3].any()
  model.velocity_out.kernel[...] = jax.random.normal(
      jax.random.key(1), model.velocity_out.kernel.shape)  # Not zero.
  latents, t = jax.random.normal(jax.random.key(0), (1, 4, 4, 4)), jnp.ones(1)
  step = model.latent_step_inputs(latents, t, jnp.array([0]))
  hidden, _ = model.mot(*step, mot_lib.init_cache(bagel.text, 1, 18), 0,
                        gen_span=bagel.latent_span)
  np.testing.assert_allclose(model.predict_velocity(empty, latents, t),
                             model.velocity(hidden[:, 1:17]), atol=1e-5)
  with pytest.raises(ValueError, match='image_positions'):
    dataclasses.replace(cfg, image_positions='per_row')
  with pytest.raises(ValueError, match='special token ids'):
    dataclasses.replace(cfg, eoi=cfg.text.vocab_size)


@pytest.mark.slow  # ~40 s cold: eager rollouts of several programs.
def test_bagel_conventions_keep_caches_and_replays_exact():
  # Every BAGEL convention on the micro model: the cached paths still equal
  # their recomputed references, and replays equal the rollouts.
  import dataclasses  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(
      presets.micro(), time_freq_dim=256, time_scale=1.0,
      sincos_w_first=True, image_positions='shared', image_brackets=True)
  model = unified.UnifiedModel(cfg, rngs=nnx.Rngs(0))
  head = model.velocity_out
  head.kernel[...] = 0.3 * jax.random.normal(jax.random.key(1),
                                             head.kernel.shape)
  rng = np.random.default_rng(0)
  prompts = jnp.asarray(rng.integers(6, 40, (2, 5)), jnp.int32)
  prompts = prompts.at[0, :2].set(cfg.pad)
  noise = jax.random.normal(jax.random.key(2), (2, 4, 4, 4))
  cached, recomputed = (sampling.sample_latents(
      velocity(model, prompts, 3.0), noise, 4, 2.0) for velocity in (
          sampling.cached_velocity, sampling.recomputed_velocity))
  np.testing.assert_allclose(cached, recomputed, atol=1e-5, rtol=1e-5)
  kwargs = dict(group=3, noise_level=0.7, cfg_mode='guided', guidance=3.0)
  out = rollout.image_rollout(model, prompts, jax.random.split(
      jax.random.key(5), 6), num_steps=3, **kwargs)
  logp, _, _ = rollout.image_logprobs(model, prompts, out['states'],
                                      out['next_states'], **kwargs)
  np.testing.assert_allclose(logp, out['logp'], atol=1e-5)
  pixels = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  out = rollout.answer_rollout(model, pixels, prompts, jax.random.split(
      jax.random.key(3), 6), group=3, num_tokens=3, temperature=1.0)
  replay = rollout.answer_logprobs(model, pixels, prompts, out['tokens'],
                                   out['mask'], group=3, temperature=1.0)
  np.testing.assert_allclose(replay, out['logp'], atol=1e-5)
  # The shared-prefix replay is the full [boi vit eoi] question + answer
  # sequence's forward (every answer token valid here).
  answers = jnp.asarray(rng.integers(6, 40, (6, 3)), jnp.int32)
  replay = rollout.answer_logprobs(model, pixels, prompts, answers,
                                   jnp.ones(answers.shape, bool), group=3,
                                   temperature=1.0)
  text = jnp.concatenate([jnp.repeat(prompts, 3, 0), answers], axis=1)
  logits = model.understanding_logits(jnp.repeat(pixels, 3, 0), text)
  logp = jax.nn.log_softmax(logits[:, 4:-1], axis=-1)
  np.testing.assert_allclose(replay, jnp.take_along_axis(
      logp, answers[..., None], axis=-1)[..., 0], atol=1e-5)


def test_bagel_names_land_on_the_right_parameters():
  state = _bagel_state_dict()
  model = convert.unified_from_bagel(state, CONFIG, image_size=8,
                                     token_ids=TOKEN_IDS)
  cfg = model.config
  assert (cfg.time_freq_dim, cfg.time_scale, cfg.sincos_w_first,
          cfg.image_positions, cfg.vit_pos_embed) == (256, 1.0, True,
                                                       'shared', True)
  assert (cfg.latent_size, cfg.latent_patch, cfg.latent_channels) == (4, 2, 2)
  assert cfg.text.qk_norm and cfg.vit.depth == 1 and not cfg.vit.use_head
  layer = 'language_model.model.layers.0.'
  pairs = {
      f'{layer}self_attn.q_proj_moe_gen.weight': model.mot.layers[0].gen.q,
      f'{layer}self_attn.q_proj.weight': model.mot.layers[0].und.q,
      f'{layer}mlp_moe_gen.down_proj.weight': model.mot.layers[0].gen.down,
      'time_embedder.mlp.0.weight': model.time_in,
      'llm2vae.weight': model.velocity_out,
      'vae2llm.weight': model.latent_in,
      'connector.fc2.weight': model.connector_out}
  for name, linear in pairs.items():
    np.testing.assert_array_equal(linear.kernel[...], state[name].T)
  np.testing.assert_array_equal(
      model.mot.layers[0].gen.k_norm.scale[...],
      state[f'{layer}self_attn.k_norm_moe_gen.weight'])
  np.testing.assert_array_equal(model.mot.gen_norm.scale[...],
                                state['language_model.model.norm_moe_gen.weight'])
  # The linear patch embedding's inputs are flattened (row, col, channel).
  w = state['vit_model.vision_model.embeddings.patch_embedding.weight']
  np.testing.assert_array_equal(model.vit.patch_embed.kernel[...][1, 0, 2],
                                w[:, (1 * 2 + 0) * 3 + 2])
  # The same weights as the convolution they came from, [D, C, p, p].
  conv = dict(state, **{'vit_model.vision_model.embeddings.patch_embedding'
                        '.weight': w.reshape(VIT_D, 2, 2, 3).transpose(
                            0, 3, 1, 2)})
  np.testing.assert_array_equal(
      convert.unified_from_bagel(conv, CONFIG, image_size=8,
                                 token_ids=TOKEN_IDS).vit.patch_embed.kernel[
                                     ...], model.vit.patch_embed.kernel[...])


@pytest.mark.mesh
def test_bagel_import_onto_a_mesh():
  # Each parameter is placed with its logical sharding on the 2 x 2 x 2
  # mesh as it is converted; the values are the single-device import's.
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  state = _bagel_state_dict()
  sharded = convert.unified_from_bagel(state, CONFIG, image_size=8,
                                       token_ids=TOKEN_IDS, mesh=mesh)
  plain = convert.unified_from_bagel(state, CONFIG, image_size=8,
                                     token_ids=TOKEN_IDS)
  params = nnx.to_flat_state(nnx.state(sharded, nnx.Param))
  specs = dict(nnx.to_flat_state(sharding.partition_specs(
      nnx.state(sharded, nnx.Param), mesh)))
  split = 0
  for path, var in params:
    assert var[...].sharding == jax.sharding.NamedSharding(
        mesh, specs[path].get_value()), path
    split += var[...].addressable_shards[0].data.shape != var.shape
  assert split > len(params) // 2  # Most parameters really are split.
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(nnx.state(sharded, nnx.Param)),
               jax.device_get(nnx.state(plain, nnx.Param)))


def _flux_state_dict(ch: int, levels: int, z: int):
  """FLUX's autoencoder names and shapes (LDM layout, one resnet per level
  in the encoder, two in the decoder) for ch_mult (1, 2, 4, ...)."""
  rng = np.random.default_rng(1)
  shapes = {}

  def conv(name, cin, cout, k=3):
    shapes[f'{name}.weight'], shapes[f'{name}.bias'] = (cout, cin, k, k), (
        cout,)

  def norm(name, c):
    shapes[f'{name}.weight'] = shapes[f'{name}.bias'] = (c,)

  def resnet(name, cin, cout):
    norm(f'{name}.norm1', cin)
    conv(f'{name}.conv1', cin, cout)
    norm(f'{name}.norm2', cout)
    conv(f'{name}.conv2', cout, cout)
    if cin != cout:
      conv(f'{name}.nin_shortcut', cin, cout, 1)

  def mid(name, c):
    resnet(f'{name}.mid.block_1', c, c)
    norm(f'{name}.mid.attn_1.norm', c)
    for p in ('q', 'k', 'v', 'proj_out'):
      conv(f'{name}.mid.attn_1.{p}', c, c, 1)
    resnet(f'{name}.mid.block_2', c, c)

  chans = [ch * 2 ** i for i in range(levels)]
  conv('encoder.conv_in', 3, ch)
  for i, c in enumerate(chans):
    resnet(f'encoder.down.{i}.block.0', chans[max(i - 1, 0)], c)
    if i < levels - 1:
      conv(f'encoder.down.{i}.downsample.conv', c, c)
  mid('encoder', chans[-1])
  norm('encoder.norm_out', chans[-1])
  conv('encoder.conv_out', chans[-1], 2 * z)
  conv('decoder.conv_in', z, chans[-1])
  mid('decoder', chans[-1])
  for i in reversed(range(levels)):  # LDM: up.0 is the full resolution.
    cin = chans[min(i + 1, levels - 1)]
    resnet(f'decoder.up.{i}.block.0', cin, chans[i])
    resnet(f'decoder.up.{i}.block.1', chans[i], chans[i])
    if i > 0:
      conv(f'decoder.up.{i}.upsample.conv', chans[i], chans[i])
  norm('decoder.norm_out', ch)
  conv('decoder.conv_out', ch, 3)
  return {k: rng.normal(size=v).astype(np.float32) for k, v in
          shapes.items()}


def test_load_bagel_reads_bagels_directory(tmp_path):
  # BAGEL's files as its app.py reads them: configs before its edits,
  # bfloat16 safetensors, special tokens in tokenizer.json.
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  llm = {k: v for k, v in CONFIG['llm_config'].items()
         if k not in ('qk_norm', 'layer_module', 'tie_word_embeddings')}
  vit = {k: v for k, v in CONFIG['vit_config'].items() if k != 'rope'}
  vit['num_hidden_layers'] = 2  # BAGEL drops the last.
  (tmp_path / 'llm_config.json').write_text(json.dumps(llm))
  (tmp_path / 'vit_config.json').write_text(json.dumps(vit))
  (tmp_path / 'tokenizer.json').write_text(json.dumps({'added_tokens': [
      {'id': 5, 'content': '<|im_start|>'}, {'id': 6, 'content': '<|im_end|>'},
      {'id': 7, 'content': '<|vision_start|>'},
      {'id': 8, 'content': '<|vision_end|>'},
      {'id': 0, 'content': '<|endoftext|>'}]}))
  state = {k: v.astype(ml_dtypes.bfloat16)
           for k, v in _bagel_state_dict().items()}
  safetensors_numpy.save_file(state, tmp_path / 'ema.safetensors')
  vae_params = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=2,
                    downsample=2, scale_factor=0.5, shift_factor=0.1)
  safetensors_numpy.save_file(_flux_state_dict(32, 2, 2),
                              tmp_path / 'ae.safetensors')
  model, vae = convert_bagel.load_bagel(
      tmp_path, image_size=8, vae_params=vae_params, config_overrides=dict(
          max_latent_size=3, vit_max_num_patch_per_side=2))
  cfg = model.config
  assert (cfg.bos, cfg.eos, cfg.boi, cfg.eoi, cfg.pad) == (5, 6, 7, 8, 0)
  assert cfg.text.qk_norm and cfg.vit.depth == 1 and cfg.timestep_shift == 3
  np.testing.assert_array_equal(
      model.mot.layers[0].gen.q.kernel[...],
      state['language_model.model.layers.0.self_attn.q_proj_moe_gen.weight']
      .astype(np.float32).T)
  assert vae.config.block_out_channels == (32, 64)
  assert vae.config.scaling_factor == 0.5


@pytest.mark.mesh
def test_bagel_import_with_scanned_layers():
  # The per-layer names fill the stacked parameters, on a mesh too; a
  # missing layer is named by its per-layer path.
  state = _bagel_state_dict()
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  scanned = convert.unified_from_bagel(state, CONFIG, image_size=8,
                                       token_ids=TOKEN_IDS, mesh=mesh,
                                       scan_layers=True)
  plain = convert.unified_from_bagel(state, CONFIG, image_size=8,
                                     token_ids=TOKEN_IDS)
  assert scanned.config.text.scan_layers
  kernel = scanned.mot.layers.gen.q.kernel[...]
  assert kernel.sharding.spec[0] is None  # 'layers' is not sharded.
  np.testing.assert_array_equal(kernel[0],
                                plain.mot.layers[0].gen.q.kernel[...])
  bad = dict(state)
  del bad['language_model.model.layers.0.mlp.up_proj.weight']
  with pytest.raises(ValueError, match=r'missing.*mot\.layers\.0\.und\.up'):
    convert.unified_from_bagel(bad, CONFIG, image_size=8,
                               token_ids=TOKEN_IDS, scan_layers=True)


def test_bagel_import_rejects_what_does_not_fit():
  state = _bagel_state_dict()
  bad = dict(state)
  del bad['llm2vae.bias']
  bad['language_model.model.layers.0.mlp_moe_gen.gate_proj.weight'] = (
      np.zeros((FFN + 1, D), np.float32))
  bad['vit_model.vision_model.head.probe'] = np.zeros((1, 1, VIT_D))
  with pytest.raises(ValueError) as err:
    convert.unified_from_bagel(bad, CONFIG, image_size=8,
                                 token_ids=TOKEN_IDS)
  for part in ('missing', 'velocity_out.bias', 'unexpected',
               'head.probe', 'mis-shaped', 'mlp_moe_gen.gate_proj'):
    assert part in str(err.value)
  bad = dict(state, **{'latent_pos_embed.pos_embed': _table(3, D)[::-1]})
  with pytest.raises(ValueError, match='latent_pos_embed.*sin-cos'):
    convert.unified_from_bagel(bad, CONFIG, image_size=8,
                                 token_ids=TOKEN_IDS)
  for change, match in ((dict(interpolate_pos=True), 'interpolate_pos'),
                        (dict(vit_config=dict(CONFIG['vit_config'],
                                              rope=True)), 'rope'),
                        (dict(max_latent_size=1), 'max_latent_size'),
                        (dict(vit_max_num_patch_per_side=3),
                         'vit_max_num_patch_per_side')):
    with pytest.raises(ValueError, match=match):
      convert.unified_from_bagel(state, {**CONFIG, **change}, image_size=8,
                                 token_ids=TOKEN_IDS)
  with pytest.raises(ValueError, match='multiple'):
    convert.unified_from_bagel(state, CONFIG, image_size=6,
                               token_ids=TOKEN_IDS)
  with pytest.raises(ValueError, match='special token ids'):
    convert.unified_from_bagel(state, CONFIG, image_size=8)  # Qwen2.5's.


def test_bagel_7b_preset_is_what_the_import_builds():
  # BAGEL-7B-MoT's llm_config.json (Qwen2.5-7B plus qk_norm) and the
  # vit_config its loaders build (so400m/14 at 980 px, 26 layers).
  qwen = dict(vocab_size=152_064, hidden_size=3584, intermediate_size=18_944,
              num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, max_position_embeddings=32_768,
              rope_theta=1_000_000.0, rms_norm_eps=1e-6, qk_norm=True,
              tie_word_embeddings=False,
              layer_module='Qwen2MoTDecoderLayer')
  vit = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
             num_attention_heads=16, image_size=980, patch_size=14,
             hidden_act='gelu_pytorch_tanh', rope=False)
  config = dict(llm_config=qwen, vit_config=vit,
                vae_config=dict(z_channels=16, downsample=8),
                latent_patch_size=2, max_latent_size=64,
                vit_max_num_patch_per_side=70, timestep_shift=3.0)
  imported = convert_bagel.bagel_config(config, image_size=512)
  preset, _ = presets.bagel_7b()
  assert imported == preset


def _reference_outputs(tmp_path):
  src = os.environ.get('LVRPO_BAGEL_SRC')
  if not src:
    pytest.skip('LVRPO_BAGEL_SRC (a BAGEL checkout) is not set')
  path = [src] + [p for p in [os.environ.get('LVRPO_BAGEL_PYTHONPATH')] if p]
  out = tmp_path / 'bagel.npz'
  script = pathlib.Path(__file__).with_name('bagel_reference.py')
  subprocess.run([sys.executable, str(script), str(out)], check=True,
                 env={**os.environ, 'PYTHONPATH': os.pathsep.join(path)})
  return np.load(out)


def test_parity_with_bagel(tmp_path):
  # Through the public API in BAGEL's template: understanding logits of
  # [boi vit eoi] [text], velocities of [bos prompt eos] then
  # [boi latents eoi], cached and recomputed, a guided sampling run and
  # greedy answers.
  ref = _reference_outputs(tmp_path)
  state = {k.removeprefix('param/'): ref[k] for k in ref.files
           if k.startswith('param/')}
  model = convert.unified_from_bagel(
      state, json.loads(str(ref['config'])), image_size=32,
      token_ids=json.loads(str(ref['token_ids'])))
  cfg = model.config
  logits = model.understanding_logits(jnp.asarray(ref['image'])[None],
                                      jnp.asarray(ref['text'])[None])
  np.testing.assert_allclose(logits[0], ref['logits'], atol=1e-4, rtol=0)
  latents = unified.unpatchify(
      jnp.asarray(ref['latent_tokens_noised'])[None], cfg.latent_patch,
      cfg.latent_size, cfg.latent_channels)
  prompt, t = jnp.asarray(ref['prompt'])[None], jnp.asarray(ref['t'][:1])
  for velocity in (model.predict_velocity(prompt, latents, t),
                   model.joint_velocity(prompt, latents, t)):
    np.testing.assert_allclose(
        unified.patchify(velocity, cfg.latent_patch)[0], ref['velocity'],
        atol=1e-4, rtol=0)
  # BAGEL's sampler: 4 Euler steps (shift 2) on the prefilled context, text
  # CFG 3 against an empty context for t in (0.5, 1] (the last step, at
  # t = 0.4, unguided), global renorm.
  noise = unified.unpatchify(jnp.asarray(ref['sample_noise'])[None],
                             cfg.latent_patch, cfg.latent_size,
                             cfg.latent_channels)
  guidance = sampling.Guidance(3.0, interval=(0.5, 1.0), renorm_min=0.0)
  out = sampling.sample_latents(sampling.cached_velocity(
      model, jnp.asarray(ref['sample_prompt'])[None], guidance), noise, 4,
                                2.0)
  np.testing.assert_allclose(unified.patchify(out, cfg.latent_patch)[0],
                             ref['sample_latents'], atol=1e-4, rtol=0)
  # BAGEL's understanding inference: [boi vit eoi] [bos q q q eos] [bos],
  # then greedy decoding. The same tokens, and its per-step logits are our
  # forward's over the answer.
  ids = json.loads(str(ref['token_ids']))
  text = jnp.asarray([[ids['bos_token_id'], *ref['answer_question'],
                       ids['eos_token_id'], ids['bos_token_id']]])
  pixels = jnp.asarray(ref['answer_image'])[None]
  n = len(ref['answer_tokens'])
  np.testing.assert_array_equal(
      sampling.greedy_answers(model, pixels, text, n)[0],
      ref['answer_tokens'])
  logits = model.understanding_logits(pixels, jnp.concatenate(
      [text, jnp.asarray(ref['answer_tokens'])[None]], axis=1))
  start = text.shape[1] - 1  # The [bos] that starts the answer.
  np.testing.assert_allclose(logits[0, start:start + n],
                             ref['answer_logits'][:n], atol=1e-4, rtol=0)
