"""BAGEL checkpoints (ByteDance-Seed/Bagel, e.g. BAGEL-7B-MoT) -> our
`UnifiedModel`.

  model, vae = load_bagel('models/BAGEL-7B-MoT', image_size=512, mesh=mesh)
  model = unified_from_bagel(state_dict, config, image_size=512)

`load_bagel` reads BAGEL's Hugging Face directory (llm_config.json,
vit_config.json, ema.safetensors, ae.safetensors, tokenizer.json) and builds
what BAGEL's app.py builds; `unified_from_bagel` is the table underneath.

`state_dict` maps BAGEL's parameter names (its `ema.safetensors`) to numpy
arrays: `language_model.*` (the Qwen2 MoT, generation expert suffixed
`_moe_gen`), `vit_model.vision_model.*` (SigLIP with a linear patch
embedding), `connector.*`, `time_embedder.*`, `vae2llm`, `llm2vae` and the
fixed sin-cos tables `vit_pos_embed` / `latent_pos_embed`. `config` is
BagelConfig as a dict: `llm_config` and `vit_config` (the dicts BAGEL builds
its modules from), `vae_config` (`z_channels`, `downsample`),
`latent_patch_size`, `max_latent_size`, `vit_max_num_patch_per_side`,
`connector_act`, `interpolate_pos`, `timestep_shift`. BAGEL's loaders build
the ViT with `vit_config.json`'s `num_hidden_layers - 1` layers and
`rope=False`: pass that config. The VAE (FLUX's `ae.safetensors`) is a
separate model.

The imported model follows BAGEL's conventions (`UnifiedConfig`): a 256-dim
timestep embedding of t itself, sin-cos tables with the column coordinate
first, one RoPE position per image, and BAGEL's sequence template (images
within [boi] ... [eoi], generation prompts [bos] prompt [eos]) with its
special token ids (`token_ids`, BAGEL's `new_token_ids`; by default those
of the Qwen2.5 vocabulary). Chat formatting of the text itself (system
prompts, roles) is the caller's, as in BAGEL.
"""

import dataclasses
import json
import pathlib
import re
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from flax import nnx

from lvrpo_jax.models import convert_qwen2
from lvrpo_jax.models import convert_siglip
from lvrpo_jax.models import convert_vae
from lvrpo_jax.models import mapping
from lvrpo_jax.models import presets
from lvrpo_jax.models import unified
from lvrpo_jax.models.mapping import Rule

_LM = r'language_model\.model\.'
_VIT = 'vit_model.vision_model.'
# (BAGEL's suffix, our expert): the understanding expert keeps Qwen2's
# names, the generation expert adds `_moe_gen`.
_EXPERTS = (('', 'und'), ('_moe_gen', 'gen'))
# Fixed sin-cos tables: checked against ours, then dropped.
_TABLES = ('vit_pos_embed.pos_embed', 'latent_pos_embed.pos_embed')
_TIME_FREQ_DIM = 256  # BAGEL's TimestepEmbedder frequency_embedding_size.
# BAGEL's FLUX autoencoder (its modeling/autoencoder.py `load_ae`).
FLUX_AE_PARAMS = dict(resolution=256, in_channels=3, downsample=8, ch=128,
                      out_ch=3, ch_mult=[1, 2, 4, 4], num_res_blocks=2,
                      z_channels=16, scale_factor=0.3611, shift_factor=0.1159)
# BagelConfig as BAGEL's app.py builds it (its inferencer samples with
# timestep_shift 3).
_BAGEL_CONFIG = dict(latent_patch_size=2, max_latent_size=64,
                     vit_max_num_patch_per_side=70,
                     connector_act='gelu_pytorch_tanh', interpolate_pos=False,
                     timestep_shift=3.0)
# Special tokens by their text (BAGEL's data_utils.add_special_tokens).
_SPECIAL_TOKENS = dict(bos_token_id='<|im_start|>', eos_token_id='<|im_end|>',
                       start_of_image='<|vision_start|>',
                       end_of_image='<|vision_end|>',
                       pad_token_id='<|endoftext|>')


def _linear(src: str, dst: str, bias: bool = True) -> tuple[Rule, ...]:
  rules = (Rule(src + r'\.weight', dst + '.kernel', 'T'),)
  return rules + ((Rule(src + r'\.bias', dst + '.bias'),) if bias else ())


def _expert_rules(suffix: str, expert: str) -> tuple[Rule, ...]:
  layer, ours = _LM + r'layers\.(\d+)\.', f'mot.layers.{{0}}.{expert}.'
  s = re.escape(suffix)
  return (
      Rule(layer + rf'input_layernorm{s}\.weight', ours + 'input_norm.scale'),
      Rule(layer + rf'post_attention_layernorm{s}\.weight',
           ours + 'post_norm.scale'),
      *(r for p in 'qkv' for r in _linear(
          layer + rf'self_attn\.{p}_proj{s}', ours + p)),
      *_linear(layer + rf'self_attn\.o_proj{s}', ours + 'o', bias=False),
      *(Rule(layer + rf'self_attn\.{p}_norm{s}\.weight',
             ours + f'{p}_norm.scale') for p in 'qk'),
      *(r for p in ('gate', 'up', 'down') for r in _linear(
          layer + rf'mlp{s}\.{p}_proj', ours + p, bias=False)))


def _patch_linear(patch: int, channels: int):
  """BAGEL's linear patch embedding [D, p*p*C] (its patches flattened
  (row, column, channel)) -> our convolution kernel [p, p, C, D]; a
  checkpoint saved before BAGEL's conversion holds the convolution
  [D, C, p, p] itself."""
  def transform(x):
    if x.ndim == 4:  # The convolution itself.
      return x.transpose(2, 3, 1, 0)
    x = mapping.reshape_or_keep(x, (x.shape[0], patch, patch, channels))
    return x.transpose(1, 2, 3, 0) if x.ndim == 4 else x
  return transform


def bagel_rules(vit_heads: int, vit_patch: int, vit_channels: int
                ) -> tuple[Rule, ...]:
  """BAGEL parameter names -> UnifiedModel paths."""
  vit = re.escape(_VIT)
  return (
      Rule(_LM + r'embed_tokens\.weight', 'mot.embed.embedding'),
      Rule(_LM + r'norm\.weight', 'mot.und_norm.scale'),
      Rule(_LM + r'norm_moe_gen\.weight', 'mot.gen_norm.scale'),
      Rule(r'language_model\.lm_head\.weight', 'mot.lm_head.kernel', 'T'),
      *(r for suffix, expert in _EXPERTS
        for r in _expert_rules(suffix, expert)),
      *_linear(r'time_embedder\.mlp\.0', 'time_in'),
      *_linear(r'time_embedder\.mlp\.2', 'time_out'),
      *_linear(r'vae2llm', 'latent_in'),
      *_linear(r'llm2vae', 'velocity_out'),
      *_linear(r'connector\.fc1', 'connector_in'),
      *_linear(r'connector\.fc2', 'connector_out'),
      # Before the SigLIP table, whose patch rule expects a convolution.
      Rule(vit + r'embeddings\.patch_embedding\.weight',
           'vit.patch_embed.kernel', _patch_linear(vit_patch, vit_channels)),
      *convert_siglip.vision_rules(vit_heads, _VIT, 'vit.'))


def bagel_config(config: Mapping[str, Any], image_size: int,
                 max_len: int | None = None,
                 token_ids: Mapping[str, int] | None = None,
                 scan_layers: bool = False) -> unified.UnifiedConfig:
  """Our UnifiedConfig from a BagelConfig dict, generating `image_size`
  pixel images (a static latent grid of image_size / downsample), with
  BAGEL's special tokens `token_ids` (default: Qwen2.5's).

  Raises:
    ValueError: for a BAGEL variant this model does not implement, or an
      image size its latent tables cannot hold.
  """
  llm = config['llm_config']
  if 'MoT' not in llm.get('layer_module', 'Qwen2MoTDecoderLayer'):
    raise ValueError(f"llm_config.layer_module={llm['layer_module']!r}: "
                     'only the Mixture-of-Transformers (Qwen2MoTDecoderLayer)'
                     ' is implemented')
  if config.get('interpolate_pos', False):
    raise ValueError('interpolate_pos=True: only extrapolated position ids '
                     "(BAGEL's default) are implemented")
  act = config.get('connector_act', 'gelu_pytorch_tanh')
  if act != 'gelu_pytorch_tanh':
    raise ValueError(f'connector_act={act!r}: only gelu_pytorch_tanh')
  vit_cfg = dict(config['vit_config'])
  if vit_cfg.get('rope', False):
    raise ValueError('vit_config.rope=True: BAGEL loads its ViT with '
                     'rope=False (learned position embeddings)')
  vit = dataclasses.replace(convert_siglip.vit_config(vit_cfg),
                            use_head=False)
  if vit.grid != config['vit_max_num_patch_per_side']:
    # BAGEL reads its ViT's learned position table at h * max + w; our ViT
    # reads it row-major over its fixed grid: the same only for a full grid.
    raise ValueError(f'ViT grid {vit.grid} (vit_config image_size / '
                     'patch_size) != vit_max_num_patch_per_side='
                     f"{config['vit_max_num_patch_per_side']}")
  vae = config['vae_config']
  patch, down = config['latent_patch_size'], vae['downsample']
  if image_size % (down * patch):
    raise ValueError(f'image_size={image_size} is not a multiple of '
                     f'downsample x latent_patch_size = {down * patch}')
  if image_size // (down * patch) > config['max_latent_size']:
    raise ValueError(f'image_size={image_size} needs a latent grid of '
                     f'{image_size // (down * patch)} > max_latent_size='
                     f"{config['max_latent_size']}")
  text = dataclasses.replace(convert_qwen2.qwen2_config(llm, max_len),
                             qk_norm=bool(llm.get('qk_norm', False)),
                             scan_layers=scan_layers)
  return unified.UnifiedConfig(
      text=text, vit=vit, latent_channels=vae['z_channels'],
      latent_size=image_size // down, latent_patch=patch,
      timestep_shift=float(config.get('timestep_shift', 1.0)),
      vit_pos_embed=True, time_freq_dim=_TIME_FREQ_DIM, time_scale=1.0,
      sincos_w_first=True, image_positions='shared', image_brackets=True,
      **presets.bagel_special_tokens(token_ids or presets.BAGEL_TOKEN_IDS))


def _check_table(name: str, table, max_side: int, grid: int, dim: int):
  """BAGEL's fixed table [max_side^2, D], read at its extrapolated ids
  h * max_side + w, must be our w-first sin-cos of (h, w) (to the
  precision of the checkpoint's dtype: BAGEL's are bfloat16)."""
  table = np.asarray(table)
  if table.shape != (max_side * max_side, dim):
    raise ValueError(f'{name}: shape {table.shape} != '
                     f'{(max_side * max_side, dim)}')
  tol = max(1e-5, 2 * float(ml_dtypes.finfo(table.dtype).eps))
  h, w = np.divmod(np.arange(grid * grid), grid)
  ours = np.asarray(unified.sincos_2d(grid, dim, w_first=True))
  if not np.allclose(table[h * max_side + w].astype(np.float32), ours,
                     atol=tol):
    raise ValueError(f"{name} is not BAGEL's 2-D sin-cos table (w first); "
                     'this checkpoint uses another position embedding')


def unified_from_bagel(state_dict: Mapping[str, Any],
                       config: Mapping[str, Any], image_size: int,
                       max_len: int | None = None,
                       token_ids: Mapping[str, int] | None = None,
                       mesh=None,
                       scan_layers: bool = False) -> unified.UnifiedModel:
  """A UnifiedModel holding a BAGEL checkpoint's weights.

  Args:
    state_dict: BAGEL parameter names -> numpy arrays.
    config: BagelConfig as a dict (see the module docstring).
    image_size: pixels of the generated images (the static latent grid).
    max_len: longest sequence (default: llm max_position_embeddings).
    token_ids: BAGEL's `new_token_ids` (bos_token_id, eos_token_id,
      start_of_image, end_of_image) and pad_token_id; default: Qwen2.5's.
    mesh: place every parameter sharded over this ('data', 'fsdp',
      'tensor') mesh by its logical axes (default: the default device).
    scan_layers: build the backbone with stacked, scanned layers (compile
      time independent of its 28 layers).

  Raises:
    ValueError: listing missing, unexpected and mis-shaped keys; for fixed
      tables that are not BAGEL's sin-cos; or for an unsupported config.
  """
  cfg = bagel_config(config, image_size, max_len, token_ids, scan_layers)
  d = cfg.text.hidden_size
  tables = {
      'vit_pos_embed.pos_embed': (config['vit_max_num_patch_per_side'],
                                  cfg.vit.grid),
      'latent_pos_embed.pos_embed': (config['max_latent_size'],
                                     cfg.latent_size // cfg.latent_patch)}
  for name, (max_side, grid) in tables.items():
    if name in state_dict:
      _check_table(name, state_dict[name], max_side, grid, d)
  model = nnx.eval_shape(lambda: unified.UnifiedModel(cfg,
                                                      rngs=nnx.Rngs(0)))
  rules = bagel_rules(cfg.vit.heads, cfg.vit.patch_size, cfg.vit.channels)
  ignore = tuple(re.escape(t) for t in _TABLES) + (r'.*position_ids',)
  return mapping.load(model, state_dict, rules, ignore, mesh)


def _token_ids(tokenizer_json: pathlib.Path) -> dict[str, int] | None:
  """BAGEL's special token ids from a tokenizer.json's added tokens."""
  if not tokenizer_json.exists():
    return None
  added = {t['content']: t['id'] for t in json.loads(
      tokenizer_json.read_text())['added_tokens']}
  missing = sorted(v for v in _SPECIAL_TOKENS.values() if v not in added)
  if missing:
    raise ValueError(f'{tokenizer_json} lacks the special tokens {missing}')
  return {k: added[v] for k, v in _SPECIAL_TOKENS.items()}


def load_bagel(model_dir, image_size: int = 512, *,
               max_len: int | None = None, mesh=None,
               scan_layers: bool = False,
               vae_params: Mapping[str, Any] | None = None,
               config_overrides: Mapping[str, Any] | None = None):
  """(UnifiedModel, AutoencoderKL) from BAGEL's Hugging Face directory.

  As BAGEL's app.py: the LLM gets QK-norms, untied embeddings and MoT
  layers; the ViT drops its last layer and uses no RoPE; the autoencoder is
  FLUX's (`vae_params`, default FLUX_AE_PARAMS); special token ids come from
  tokenizer.json (Qwen2.5's without one). Weights are read with
  safetensors (bfloat16 stays bfloat16 until each parameter is placed).

  Args:
    model_dir: holds llm_config.json, vit_config.json, ema.safetensors,
      ae.safetensors and, optionally, tokenizer.json.
    image_size: pixels of the generated images.
    max_len: longest sequence (default: llm max_position_embeddings).
    mesh: place every parameter sharded over this mesh as it is converted.
    scan_layers: stacked, scanned backbone layers.
    vae_params: FLUX AutoEncoderParams as a dict.
    config_overrides: BagelConfig fields other than app.py's
      (latent_patch_size 2, max_latent_size 64, vit_max_num_patch_per_side
      70, timestep_shift 3).
  """
  # Reads bfloat16 through ml_dtypes (imported above), which registers it
  # with numpy.
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  model_dir = pathlib.Path(model_dir)
  llm = json.loads((model_dir / 'llm_config.json').read_text())
  llm.update(qk_norm=True, tie_word_embeddings=False,
             layer_module='Qwen2MoTDecoderLayer')
  vit = json.loads((model_dir / 'vit_config.json').read_text())
  vit.update(rope=False, num_hidden_layers=vit['num_hidden_layers'] - 1)
  vae_params = dict(vae_params or FLUX_AE_PARAMS)
  config = dict(_BAGEL_CONFIG, **(config_overrides or {}),
                llm_config=llm, vit_config=vit,
                vae_config=dict(z_channels=vae_params['z_channels'],
                                downsample=vae_params['downsample']))
  model = unified_from_bagel(
      load_file(model_dir / 'ema.safetensors'), config, image_size, max_len,
      _token_ids(model_dir / 'tokenizer.json'), mesh, scan_layers)
  vae = convert_vae.vae_from_flux(load_file(model_dir / 'ae.safetensors'),
                                  vae_params, mesh)
  return model, vae
