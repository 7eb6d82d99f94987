"""Runs BAGEL's own torch model (a tiny random one) and saves its outputs.

  PYTHONPATH=<BAGEL checkout>:<transformers==4.49 site> \
      python tests/models/bagel_reference.py OUT.npz

The reference side of `test_bagel.py`'s parity test. It runs in its own
process because BAGEL's code needs the transformers it pins (4.49), which is
not the one our other parity tests use.

BAGEL's ViT attention calls `flash_attn_varlen_func`, which has no CPU
build, on inputs cast to bfloat16 (flash-attn's kernels take 16-bit inputs
only); so does its language model's inference path. A float32 stand-in
(`varlen_attention`: softmax attention within each packed sequence)
replaces it, and BAGEL's modules read `torch.bfloat16` as float32, so the
comparison is float32 throughout; the math is BAGEL's.

One packed batch of two samples goes through `Bagel.forward` (flex
attention, float32), in BAGEL's template:
  understanding  [soi vit x 4 eoi] [t t t t t]          full, causal
  generation     [bos p p eos] [soi latent x 4 eoi]     causal, noise
The image blocks share one RoPE position each (BAGEL's data packing).
Then `sample` runs BAGEL's text-to-image sampler and `answer` its
understanding inference on the same weights.
Forward hooks record the noised latents and timesteps entering the latent
projection, the velocities leaving `llm2vae` and the text logits; the npz
holds them with every parameter, the inputs and the config (as JSON).
"""

import importlib.machinery
import json
import sys
import types

import numpy as np
import torch


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                     max_seqlen_k=None, causal=False, **unused):
  """flash-attn's varlen attention ([T, H, E] packed, sequences delimited by
  cu_seqlens) in float32 torch; causal masks are aligned bottom-right, as
  flash-attn's."""
  del max_seqlen_q, max_seqlen_k, unused
  out = []
  for i in range(len(cu_seqlens_q) - 1):
    qs = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]].transpose(0, 1)
    ks = k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].transpose(0, 1)
    vs = v[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].transpose(0, 1)
    ks = ks.repeat_interleave(qs.shape[0] // ks.shape[0], 0)
    vs = vs.repeat_interleave(qs.shape[0] // vs.shape[0], 0)
    mask = None
    if causal:
      tq, tk = qs.shape[1], ks.shape[1]
      mask = (torch.arange(tk)[None] <= torch.arange(tq)[:, None] + tk - tq)
    out.append(torch.nn.functional.scaled_dot_product_attention(
        qs, ks, vs, attn_mask=mask).transpose(0, 1))
  return torch.cat(out)


class _Float32Torch:
  """`torch` for BAGEL's modules, with bfloat16 read as float32."""

  def __getattr__(self, name):
    return torch.float32 if name == 'bfloat16' else getattr(torch, name)


_flash_attn = types.ModuleType('flash_attn')
_flash_attn.__spec__ = importlib.machinery.ModuleSpec('flash_attn', None)
_flash_attn.flash_attn_varlen_func = varlen_attention
sys.modules['flash_attn'] = _flash_attn

# pylint: disable=g-import-not-at-top,wrong-import-position
import data.data_utils as data_utils
import modeling.bagel.bagel as bagel_module
import modeling.bagel.qwen2_navit as qwen2_navit
import modeling.bagel.siglip_navit as siglip_navit
from modeling.bagel import BagelConfig, Bagel, Qwen2Config, Qwen2ForCausalLM
from modeling.bagel import SiglipVisionConfig, SiglipVisionModel
from torch.nn.attention import flex_attention

VOCAB, PAD, BOS, EOS, SOI, EOI = 64, 0, 1, 2, 3, 4
VIT_IMAGE, VIT_PATCH = 28, 14  # A 2 x 2 patch grid.
Z, DOWN, LATENT_PATCH = 4, 8, 2  # 32 px -> 4 x 4 x 4 latent -> 2 x 2 tokens.
IMAGE = 32


def _block_mask_eager(*args, **kwargs):
  # BAGEL compiles its block mask; torch.compile is not needed for a few
  # dozen tokens on a CPU.
  kwargs['_compile'] = False
  return flex_attention.create_block_mask(*args, **kwargs)


def build(seed: int = 0) -> tuple[Bagel, dict]:
  llm = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128,
             rope_theta=10_000.0, rms_norm_eps=1e-6, qk_norm=True,
             tie_word_embeddings=False,
             layer_module='Qwen2MoTDecoderLayer', freeze_und=False)
  # As BAGEL's loaders: vit_config.json's layers minus one, no ViT RoPE.
  vit = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2 - 1,
             num_attention_heads=2, num_channels=3, image_size=VIT_IMAGE,
             patch_size=VIT_PATCH, layer_norm_eps=1e-6,
             hidden_act='gelu_pytorch_tanh', rope=False)
  config = dict(
      llm_config=llm, vit_config=vit,
      vae_config=dict(z_channels=Z, downsample=DOWN),
      latent_patch_size=LATENT_PATCH,
      # Larger than the 2 x 2 latent grid, so its extrapolated position ids
      # h * max + w differ from the row-major ones. The ViT's must be its
      # grid (its learned table is read at the same ids).
      max_latent_size=3, vit_max_num_patch_per_side=2,
      connector_act='gelu_pytorch_tanh', interpolate_pos=False,
      timestep_shift=2.0)
  torch.manual_seed(seed)
  language_model = Qwen2ForCausalLM(Qwen2Config(**llm))
  vit_model = SiglipVisionModel(SiglipVisionConfig(**vit))
  vit_model.vision_model.embeddings.convert_conv2d_to_linear(
      SiglipVisionConfig(**vit))
  bagel_config = BagelConfig(
      visual_gen=True, visual_und=True,
      llm_config=Qwen2Config(**llm), vit_config=SiglipVisionConfig(**vit),
      vae_config=types.SimpleNamespace(**config['vae_config']),
      **{k: v for k, v in config.items()
         if k not in ('llm_config', 'vit_config', 'vae_config')})
  model = Bagel(language_model, vit_model, bagel_config)
  # Random values everywhere (BAGEL zero-initializes llm2vae; norms start
  # at one), except the fixed sin-cos tables.
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith('pos_embed.pos_embed'):
        continue
      if 'norm' in name and name.endswith('weight'):
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
      else:
        param.copy_(0.2 * torch.randn_like(param))
  return model.train(), config


def run(model: Bagel, config: dict) -> dict:
  """BAGEL's training forward on the packed batch of the module docstring,
  its outputs recorded by forward hooks."""
  rng = np.random.default_rng(0)
  text = rng.integers(5, VOCAB, 5)
  prompt = rng.integers(5, VOCAB, 2)
  image = rng.uniform(-1, 1, (3, VIT_IMAGE, VIT_IMAGE)).astype(np.float32)
  latent = rng.normal(size=(Z, IMAGE // DOWN, IMAGE // DOWN)).astype(
      np.float32)
  n_vit = (VIT_IMAGE // VIT_PATCH) ** 2
  n_lat = (IMAGE // DOWN // LATENT_PATCH) ** 2

  # Understanding: [soi vit eoi] at position 0, then 5 text tokens (which
  # carry their own chat tokens in BAGEL). Generation: [bos p p eos], then
  # [soi latents eoi] at position 4.
  len0, len1 = n_vit + 2 + len(text), 4 + n_lat + 2
  vit_idx = list(range(1, 1 + n_vit))
  text_idx = [0, 1 + n_vit] + list(range(n_vit + 2, len0))
  ids = [SOI, EOI, *text]
  positions = [0] * (n_vit + 2) + list(range(1, 1 + len(text)))
  text_idx += [len0 + i for i in (0, 1, 2, 3, 4, 5 + n_lat)]
  ids += [BOS, *prompt, EOS, SOI, EOI]
  positions += [0, 1, 2, 3] + [4] * (n_lat + 2)
  vae_idx = list(range(len0 + 5, len0 + 5 + n_lat))

  vit_patches = data_utils.patchify(torch.tensor(image), VIT_PATCH)
  vit_pos = data_utils.get_flattened_position_ids_extrapolate(
      VIT_IMAGE, VIT_IMAGE, VIT_PATCH,
      config['vit_max_num_patch_per_side'])
  lat_pos = data_utils.get_flattened_position_ids_extrapolate(
      IMAGE, IMAGE, DOWN * LATENT_PATCH, config['max_latent_size'])
  ce = torch.zeros(len0 + len1, dtype=torch.bool)
  ce[n_vit + 2:len0] = True
  mse = torch.zeros(len0 + len1, dtype=torch.bool)
  mse[vae_idx] = True
  timestep_logit = 0.3  # BAGEL draws logits; sigmoid, then the shift.

  captured = {}
  model.vae2llm.register_forward_hook(
      lambda m, inp, out: captured.__setitem__('noised', inp[0].detach()))
  model.time_embedder.register_forward_hook(
      lambda m, inp, out: captured.__setitem__('t', inp[0].detach()))
  model.llm2vae.register_forward_hook(
      lambda m, inp, out: captured.__setitem__('velocity', out.detach()))
  model.language_model.lm_head.register_forward_hook(
      lambda m, inp, out: captured.__setitem__('logits', out.detach()))
  bagel_module.create_block_mask = _block_mask_eager
  siglip_navit.torch = _Float32Torch()
  with torch.no_grad():
    model(
        sequence_length=len0 + len1,
        packed_text_ids=torch.tensor(ids, dtype=torch.long),
        packed_text_indexes=torch.tensor(text_idx, dtype=torch.long),
        sample_lens=[len0, len1],
        packed_position_ids=torch.tensor(positions, dtype=torch.long),
        split_lens=[n_vit + 2, len(text), 4, n_lat + 2],
        attn_modes=['full', 'causal', 'causal', 'noise'],
        ce_loss_indexes=ce,
        packed_label_ids=torch.zeros(int(ce.sum()), dtype=torch.long),
        packed_vit_tokens=vit_patches,
        packed_vit_token_indexes=torch.tensor(vit_idx, dtype=torch.long),
        packed_vit_position_ids=vit_pos,
        vit_token_seqlens=torch.tensor([n_vit], dtype=torch.int),
        padded_latent=torch.tensor(latent)[None],
        patchified_vae_latent_shapes=[(IMAGE // DOWN // LATENT_PATCH,) * 2],
        packed_latent_position_ids=lat_pos,
        packed_vae_token_indexes=torch.tensor(vae_idx, dtype=torch.long),
        packed_timesteps=torch.full((n_lat,), timestep_logit),
        mse_loss_indexes=mse)
  return dict(
      text=text, prompt=prompt, image=image.transpose(1, 2, 0),
      token_ids=json.dumps(dict(bos_token_id=BOS, eos_token_id=EOS,
                                start_of_image=SOI, end_of_image=EOI,
                                pad_token_id=PAD)),
      latent_tokens_noised=captured['noised'].numpy(),
      t=captured['t'].numpy(), velocity=captured['velocity'].numpy(),
      logits=captured['logits'].numpy())


def sample(model: Bagel) -> dict:
  """BAGEL's own text-to-image sampler (`generate_image`, inference path
  with its KV cache): [bos p p p eos] prefilled, then 4 Euler steps over
  [soi latents eoi], text CFG 3 against an empty context for t in (0.5, 1],
  global renorm; float32 (the bfloat16 casts read as float32)."""
  qwen2_navit.torch = _Float32Torch()
  siglip_navit.torch = _Float32Torch()
  model.eval()
  layers = model.config.llm_config.num_hidden_layers
  prompt = np.random.default_rng(1).integers(5, VOCAB, 3)
  ids = [BOS, *prompt, EOS]
  n = len(ids)
  torch.manual_seed(1)
  with torch.no_grad():
    cache = model.forward_cache_update_text(
        qwen2_navit.NaiveCache(layers),
        packed_text_ids=torch.tensor(ids, dtype=torch.long),
        packed_text_position_ids=torch.arange(n),
        text_token_lens=torch.tensor([n], dtype=torch.int),
        packed_text_indexes=torch.arange(n),
        packed_key_value_indexes=torch.tensor([], dtype=torch.long),
        key_values_lens=torch.tensor([0], dtype=torch.int))
    gen = model.prepare_vae_latent(
        curr_kvlens=[n], curr_rope=[n], image_sizes=[(IMAGE, IMAGE)],
        new_token_ids=dict(start_of_image=SOI, end_of_image=EOI))
    cfg = model.prepare_vae_latent_cfg(curr_kvlens=[0], curr_rope=[0],
                                       image_sizes=[(IMAGE, IMAGE)])
    latents = model.generate_image(
        past_key_values=cache, **gen, num_timesteps=5, timestep_shift=2.0,
        cfg_text_scale=3.0, cfg_interval=[0.5, 1.0], cfg_renorm_min=0.0,
        cfg_renorm_type='global',
        cfg_text_packed_position_ids=cfg['cfg_packed_position_ids'],
        cfg_text_packed_query_indexes=cfg['cfg_packed_query_indexes'],
        cfg_text_key_values_lens=cfg['cfg_key_values_lens'],
        cfg_text_past_key_values=qwen2_navit.NaiveCache(layers),
        cfg_text_packed_key_value_indexes=cfg[
            'cfg_packed_key_value_indexes'])[0]
  return dict(sample_prompt=prompt,
              sample_noise=gen['packed_init_noises'].numpy(),
              sample_latents=latents.numpy())


class _Ids:
  """A tokenizer for BAGEL's prepare_prompts whose 'text' is its ids."""

  def encode(self, ids):
    return list(ids)


def answer(model: Bagel) -> dict:
  """BAGEL's own understanding inference (as its `chat`, greedy): the image
  as [soi vit eoi], the question as [bos q q q eos], then tokens decoded
  from a [bos] start token through its KV cache, with each step's logits."""
  model.eval()
  layers = model.config.llm_config.num_hidden_layers
  rng = np.random.default_rng(2)
  image = rng.uniform(-1, 1, (3, VIT_IMAGE, VIT_IMAGE)).astype(np.float32)
  question = rng.integers(5, VOCAB, 3)
  token_ids = dict(bos_token_id=BOS, eos_token_id=EOS, start_of_image=SOI,
                   end_of_image=EOI)
  with torch.no_grad():
    inputs, lens, ropes = model.prepare_vit_images(
        curr_kvlens=[0], curr_rope=[0], images=[torch.tensor(image)],
        transforms=lambda x: x, new_token_ids=token_ids)
    cache = model.forward_cache_update_vit(qwen2_navit.NaiveCache(layers),
                                           **inputs)
    inputs, lens, ropes = model.prepare_prompts(
        curr_kvlens=lens, curr_rope=ropes, prompts=[question.tolist()],
        tokenizer=_Ids(), new_token_ids=token_ids)
    cache = model.forward_cache_update_text(cache, **inputs)
    step_logits = []
    hook = model.language_model.lm_head.register_forward_hook(
        lambda m, inp, out: step_logits.append(out.detach()[0]))
    tokens = model.generate_text(
        past_key_values=cache, max_length=5, do_sample=False,
        end_token_id=EOS, **model.prepare_start_tokens(lens, ropes,
                                                       token_ids))
    hook.remove()
  return dict(answer_image=image.transpose(1, 2, 0),
              answer_question=question, answer_tokens=tokens[1:, 0].numpy(),
              answer_logits=torch.stack(step_logits).numpy())


def main():
  model, config = build()
  out = run(model, config)
  out.update(sample(model))
  out.update(answer(model))
  state = {f'param/{k}': v.detach().numpy()
           for k, v in model.state_dict().items()}
  np.savez(sys.argv[1], config=json.dumps(config), **out, **state)


if __name__ == '__main__':
  main()
