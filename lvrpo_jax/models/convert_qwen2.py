"""transformers Qwen2 checkpoints -> our MoT backbone.

  mot = mot_from_qwen2(state_dict, config)   # Qwen2ForCausalLM

Both experts of every layer start from the language model's weights, as
BAGEL initializes its generation expert.
"""

import dataclasses
from typing import Any, Mapping

import numpy as np
from flax import nnx

from lvrpo_jax.models import mapping
from lvrpo_jax.models import mot as mot_lib
from lvrpo_jax.models.mapping import Rule
from lvrpo_jax.models.transformer import TransformerConfig

_BOTH = ('und', 'gen')


def _experts(target: str) -> tuple[str, ...]:
  """Both experts' copies of a layer parameter: BAGEL initializes the
  generation expert from the language model's weights too."""
  return tuple(target.format(i='{0}', e=e) for e in _BOTH)


QWEN2_RULES: tuple[Rule, ...] = (
    Rule(r'model\.embed_tokens\.weight', 'embed.embedding'),
    Rule(r'model\.norm\.weight', ('und_norm.scale', 'gen_norm.scale')),
    Rule(r'lm_head\.weight', 'lm_head.kernel', 'T'),
    Rule(r'model\.layers\.(\d+)\.input_layernorm\.weight',
         _experts('layers.{i}.{e}.input_norm.scale')),
    Rule(r'model\.layers\.(\d+)\.post_attention_layernorm\.weight',
         _experts('layers.{i}.{e}.post_norm.scale')),
    *(Rule(rf'model\.layers\.(\d+)\.self_attn\.{p}_proj\.weight',
           _experts(f'layers.{{i}}.{{e}}.{p}.kernel'), 'T')
      for p in ('q', 'k', 'v', 'o')),
    *(Rule(rf'model\.layers\.(\d+)\.self_attn\.{p}_proj\.bias',
           _experts(f'layers.{{i}}.{{e}}.{p}.bias'))
      for p in ('q', 'k', 'v')),
    *(Rule(rf'model\.layers\.(\d+)\.mlp\.{p}_proj\.weight',
           _experts(f'layers.{{i}}.{{e}}.{p}.kernel'), 'T')
      for p in ('gate', 'up', 'down')),
)


def qwen2_config(config: Mapping[str, Any], max_len: int | None = None
                 ) -> TransformerConfig:
  """Our backbone config from a transformers Qwen2Config dict."""
  heads = config['num_attention_heads']
  return TransformerConfig(
      vocab_size=config['vocab_size'], hidden_size=config['hidden_size'],
      num_layers=config['num_hidden_layers'], num_heads=heads,
      num_kv_heads=config.get('num_key_value_heads', heads),
      head_dim=config.get('head_dim') or config['hidden_size'] // heads,
      intermediate_size=config['intermediate_size'],
      rope_theta=float(_rope_theta(config)),
      rms_norm_eps=config.get('rms_norm_eps', 1e-6),
      tie_embeddings=bool(config.get('tie_word_embeddings', False)),
      max_len=max_len or config.get('max_position_embeddings', 32_768))


def _rope_theta(config):
  if 'rope_theta' in config:
    return config['rope_theta']
  return (config.get('rope_parameters') or {}).get('rope_theta', 10_000.0)


def mot_from_qwen2(state_dict: Mapping[str, np.ndarray],
                   config: Mapping[str, Any],
                   max_len: int | None = None,
                   mesh=None, scan_layers: bool = False) -> mot_lib.MoT:
  """A MoT whose two experts both start from a Qwen2ForCausalLM's weights.

  Args:
    state_dict: transformers parameter names -> numpy arrays.
    config: the Qwen2Config as a dict (`config.to_dict()`).
    max_len: longest sequence the model accepts (default: the config's
      max_position_embeddings).
    mesh: place every parameter sharded over this ('data', 'fsdp',
      'tensor') mesh by its logical axes (default: the default device).
    scan_layers: build the MoT with stacked, scanned layers.

  Raises:
    ValueError: listing missing, unexpected and mis-shaped keys.
  """
  cfg = dataclasses.replace(qwen2_config(config, max_len),
                            scan_layers=scan_layers)
  model = nnx.eval_shape(lambda: mot_lib.MoT(cfg, rngs=nnx.Rngs(0)))
  # A tied checkpoint may still list lm_head.weight (the same tensor).
  ignore = (r'lm_head\.weight',) if cfg.tie_embeddings else ()
  return mapping.load(model, state_dict, QWEN2_RULES, ignore, mesh)
