"""transformers SigLIP checkpoints -> our `ViT` and `DualEncoder`.

  vit = vit_from_siglip(state_dict, config)            # SiglipVisionModel
  enc = dual_encoder_from_siglip(state_dict, config)   # SiglipModel

`state_dict` maps transformers' parameter names to numpy arrays; `config`
is the transformers config as a dict (`config.to_dict()`, or a checkpoint's
config.json: fields it leaves out take transformers' defaults). A state dict
that does not fit the model is rejected with one ValueError listing every
missing, unexpected and mis-shaped key (`mapping.load`).

Layouts: torch Linear weights [out, in] become kernels [in, out]; attention
projections are further split into heads, q/k/v [H E, D] -> [D, H, E] and
out [D, H E] -> [H, E, D]; the MAP head's fused `in_proj_weight` [3 D, D]
(torch.nn.MultiheadAttention) is split into q, k and v first; the patch
convolution [D, C, p, p] becomes [p, p, C, D].
"""

import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from lvrpo_jax.models import dual_encoder as dual_lib
from lvrpo_jax.models import mapping
from lvrpo_jax.models import vit as vit_lib
from lvrpo_jax.models.mapping import Rule

# Fields that a checkpoint's config.json may leave out, with transformers'
# defaults (SiglipVisionConfig / SiglipTextConfig, transformers 5.x).
_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
    hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6, vision_use_head=True)
_TEXT_DEFAULTS = dict(
    vocab_size=32_000, hidden_size=768, intermediate_size=3072,
    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=64,
    hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6, projection_size=None)
# Buffers, not parameters (older checkpoints saved them).
_IGNORE = (r'.*position_ids',)
_VISION_PREFIX = 'vision_model.'


def _fill(config: Mapping[str, Any], defaults: dict, what: str) -> dict:
  config = {**defaults, **{k: v for k, v in config.items()
                           if v is not None or k not in defaults}}
  if config['hidden_act'] != 'gelu_pytorch_tanh':
    raise ValueError(f'{what}.hidden_act={config["hidden_act"]!r}: only '
                     f"'gelu_pytorch_tanh' (SigLIP's) is implemented")
  return config


def _side(size, name: str) -> int:
  """An int, or a square [h, w] pair, as one int."""
  if isinstance(size, (list, tuple)):
    if len(size) != 2 or size[0] != size[1]:
      raise ValueError(f'{name}={size!r}: only square sizes are supported')
    size = size[0]
  return int(size)


def vit_config(config: Mapping[str, Any]) -> vit_lib.ViTConfig:
  """Our ViTConfig from a SiglipVisionConfig dict (or a SiglipConfig dict,
  whose `vision_config` is used)."""
  c = _fill(config.get('vision_config') or config, _VISION_DEFAULTS,
            'vision_config')
  return vit_lib.ViTConfig(
      image_size=_side(c['image_size'], 'image_size'),
      patch_size=_side(c['patch_size'], 'patch_size'),
      width=c['hidden_size'], depth=c['num_hidden_layers'],
      heads=c['num_attention_heads'], mlp_dim=c['intermediate_size'],
      channels=c['num_channels'], layer_norm_eps=c['layer_norm_eps'],
      use_head=bool(c['vision_use_head']))


def dual_encoder_config(config: Mapping[str, Any]
                        ) -> dual_lib.DualEncoderConfig:
  """Our DualEncoderConfig from a SiglipConfig dict."""
  t = _fill(config.get('text_config') or {}, _TEXT_DEFAULTS, 'text_config')
  text = dual_lib.TextConfig(
      vocab_size=t['vocab_size'], max_len=t['max_position_embeddings'],
      width=t['hidden_size'], depth=t['num_hidden_layers'],
      heads=t['num_attention_heads'], mlp_dim=t['intermediate_size'],
      projection_dim=t['projection_size'] or t['hidden_size'],
      layer_norm_eps=t['layer_norm_eps'])
  return dual_lib.DualEncoderConfig(
      vision=vit_config(config.get('vision_config') or {}), text=text)


def _heads_in(heads: int):
  """q/k/v weight [H E, D] -> [D, H, E]; bias [H E] -> [H, E]."""
  def transform(x):
    if x.ndim == 2:
      return mapping.reshape_or_keep(x.T, (x.shape[1], heads, -1))
    return mapping.reshape_or_keep(x, (heads, -1))
  return transform


def _heads_out(heads: int):
  """out_proj weight [D, H E] -> [H, E, D]."""
  def transform(x):
    if x.ndim != 2:
      return x
    return mapping.reshape_or_keep(x.T, (heads, -1, x.shape[0]))
  return transform


def _scalar(x):
  return mapping.reshape_or_keep(x, ())


def _layer_norm(src: str, dst: str) -> tuple[Rule, ...]:
  return (Rule(src + r'\.weight', dst + '.scale'),
          Rule(src + r'\.bias', dst + '.bias'))


def _mlp(src: str, dst: str) -> tuple[Rule, ...]:
  return tuple(Rule(src + rf'{fc}\.{kind}', f'{dst}{fc}.{ours}', t)
               for fc in ('fc1', 'fc2')
               for kind, ours, t in (('weight', 'kernel', 'T'),
                                     ('bias', 'bias', None)))


def _attention(src: str, dst: str, heads: int,
               names: dict[str, str]) -> tuple[Rule, ...]:
  """Rules for one attention; `names[ours]` is the regex of our projection
  `ours`'s source parameter, a format string over `kind` (weight, bias)."""
  rules = []
  for ours in ('query', 'key', 'value'):
    for kind in ('weight', 'bias'):
      source = names[ours].format(kind=kind)
      rules.append(Rule(src + source, f'{dst}{ours}.'
                        f'{"kernel" if kind == "weight" else "bias"}',
                        _heads_in(heads)))
  rules += [Rule(src + r'out_proj\.weight', dst + 'out.kernel',
                 _heads_out(heads)),
            Rule(src + r'out_proj\.bias', dst + 'out.bias')]
  return tuple(rules)


_SELF_ATTN = {'query': r'q_proj\.{kind}', 'key': r'k_proj\.{kind}',
              'value': r'v_proj\.{kind}'}
_FUSED_ATTN = {ours: rf'in_proj_{{kind}}\[{ours}\]'
               for ours in ('query', 'key', 'value')}


def _encoder(src: str, dst: str, heads: int) -> tuple[Rule, ...]:
  """SiglipEncoder layers under `src` -> our blocks under `dst`."""
  layer, block = src + r'encoder\.layers\.(\d+)\.', dst + 'blocks.{0}.'
  return (*_layer_norm(layer + 'layer_norm1', block + 'norm1'),
          *_layer_norm(layer + 'layer_norm2', block + 'norm2'),
          *_attention(layer + r'self_attn\.', block + 'attn.', heads,
                      _SELF_ATTN),
          *_mlp(layer + r'mlp\.', block + 'mlp.'))


def vision_rules(heads: int, src: str = '', dst: str = ''
                 ) -> tuple[Rule, ...]:
  """SiglipVisionModel names (after `src`) -> ViT paths (after `dst`)."""
  s = re.escape(src)
  return (
      Rule(s + r'embeddings\.patch_embedding\.weight',
           dst + 'patch_embed.kernel', 'conv'),
      Rule(s + r'embeddings\.patch_embedding\.bias', dst + 'patch_embed.bias'),
      Rule(s + r'embeddings\.position_embedding\.weight', dst + 'pos_embed'),
      *_encoder(s, dst, heads),
      *_layer_norm(s + 'post_layernorm', dst + 'post_norm'),
      Rule(s + r'head\.probe', dst + 'head.probe'),
      *_attention(s + r'head\.attention\.', dst + 'head.attn.', heads,
                  _FUSED_ATTN),
      *_layer_norm(s + r'head\.layernorm', dst + 'head.norm'),
      *_mlp(s + r'head\.mlp\.', dst + 'head.mlp.'))


def text_rules(heads: int, src: str = 'text_model.', dst: str = 'text.'
               ) -> tuple[Rule, ...]:
  """SiglipTextModel names (after `src`) -> TextTower paths (after `dst`)."""
  s = re.escape(src)
  return (
      Rule(s + r'embeddings\.token_embedding\.weight',
           dst + 'token_embed.embedding'),
      Rule(s + r'embeddings\.position_embedding\.weight', dst + 'pos_embed'),
      *_encoder(s, dst, heads),
      *_layer_norm(s + 'final_layer_norm', dst + 'final_norm'),
      Rule(s + r'head\.weight', dst + 'head.kernel', 'T'),
      Rule(s + r'head\.bias', dst + 'head.bias'))


def dual_encoder_rules(vision_heads: int, text_heads: int
                       ) -> tuple[Rule, ...]:
  """SiglipModel names -> DualEncoder paths."""
  return (*vision_rules(vision_heads, _VISION_PREFIX, 'vision.'),
          *text_rules(text_heads),
          Rule(r'logit_scale', 'logit_scale', _scalar),
          Rule(r'logit_bias', 'logit_bias', _scalar))


def _split_fused(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The MAP head's fused in_proj_{weight,bias} [3 D, ...] -> three named
  [D, ...] pieces 'in_proj_weight[query]', ... (q, k, v in that order)."""
  out = {}
  for name, value in state_dict.items():
    if not re.fullmatch(r'.*head\.attention\.in_proj_(weight|bias)', name):
      out[name] = value
      continue
    pieces = np.array_split(np.asarray(value), 3, axis=0)
    for ours, piece in zip(('query', 'key', 'value'), pieces):
      out[f'{name}[{ours}]'] = piece
  return out


def vit_from_siglip(state_dict: Mapping[str, Any],
                    config: Mapping[str, Any], mesh=None) -> vit_lib.ViT:
  """A ViT holding a transformers SiglipVisionModel's weights.

  Args:
    state_dict: SiglipVisionModel parameter names -> numpy arrays, with or
      without the 'vision_model.' prefix.
    config: the SiglipVisionConfig as a dict.
    mesh: place every parameter sharded over this ('data', 'fsdp',
      'tensor') mesh by its logical axes (default: the default device).

  Raises:
    ValueError: listing missing, unexpected and mis-shaped keys, or for a
      config this model does not implement.
  """
  cfg = vit_config(config)
  stripped = {name.removeprefix(_VISION_PREFIX): value
              for name, value in state_dict.items()}
  if len(stripped) != len(state_dict):
    raise ValueError("state dict holds some keys both with and without the "
                     f"'{_VISION_PREFIX}' prefix")
  model = nnx.eval_shape(lambda: vit_lib.ViT(cfg, rngs=nnx.Rngs(0)))
  return mapping.load(model, _split_fused(stripped),
                      vision_rules(cfg.heads), _IGNORE, mesh)


def dual_encoder_from_siglip(state_dict: Mapping[str, Any],
                             config: Mapping[str, Any], mesh=None
                             ) -> dual_lib.DualEncoder:
  """A DualEncoder holding a transformers SiglipModel's weights.

  Args:
    state_dict: SiglipModel parameter names ('vision_model.*',
      'text_model.*', 'logit_scale', 'logit_bias') -> numpy arrays.
    config: the SiglipConfig as a dict (with 'vision_config' and
      'text_config').
    mesh: place every parameter sharded over this ('data', 'fsdp',
      'tensor') mesh by its logical axes (default: the default device).

  Raises:
    ValueError: listing missing, unexpected and mis-shaped keys, or for a
      config this model does not implement.
  """
  cfg = dual_encoder_config(config)
  model = nnx.eval_shape(lambda: dual_lib.DualEncoder(cfg, rngs=nnx.Rngs(0)))
  rules = dual_encoder_rules(cfg.vision.heads, cfg.text.heads)
  return mapping.load(model, _split_fused(state_dict), rules, _IGNORE, mesh)
