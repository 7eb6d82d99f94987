"""diffusers AutoencoderKL state dicts -> `vae.AutoencoderKL`.

Our parameter paths mirror diffusers' module names, so the table mostly
renames leaves (weight -> kernel / scale) and transposes; the exceptions are
the one-element ModuleLists (`downsamplers.0`, `upsamplers.0`,
`attentions.0`, `to_out.0`) that our modules hold as single attributes.
"""

from typing import Any, Mapping

import numpy as np
from flax import nnx

from lvrpo_jax.models import mapping
from lvrpo_jax.models import vae

_LEAVES = {  # kind -> (weight leaf, weight transform)
    'conv': ('kernel', 'conv'),
    'norm': ('scale', None),
    'linear': ('kernel', 'T'),
}
_ATTN = r'(encoder|decoder)\.mid_block\.attentions\.0'
# (diffusers module regex, our module path format, kind); first match wins.
_MODULES = (
    (_ATTN + r'\.(to_q|to_k|to_v)', '{}.mid_block.attention.{}', 'linear'),
    (_ATTN + r'\.to_out\.0', '{}.mid_block.attention.to_out', 'linear'),
    (_ATTN + r'\.group_norm', '{}.mid_block.attention.group_norm', 'norm'),
    # Checkpoints saved before diffusers 0.14 name the attention's leaves
    # like this; diffusers renames them on load, and so do we.
    (_ATTN + r'\.query', '{}.mid_block.attention.to_q', 'linear'),
    (_ATTN + r'\.key', '{}.mid_block.attention.to_k', 'linear'),
    (_ATTN + r'\.value', '{}.mid_block.attention.to_v', 'linear'),
    (_ATTN + r'\.proj_attn', '{}.mid_block.attention.to_out', 'linear'),
    (r'(encoder\.down_blocks\.\d+)\.downsamplers\.0\.conv', '{}.downsample',
     'conv'),
    (r'(decoder\.up_blocks\.\d+)\.upsamplers\.0\.conv', '{}.upsample',
     'conv'),
    (r'(.+\.norm[12]|(?:en|de)coder\.conv_norm_out)', '{}', 'norm'),
    (r'(.+\.conv(?:1|2|_shortcut)|(?:en|de)coder\.conv_(?:in|out)'
     r'|quant_conv|post_quant_conv)', '{}', 'conv'),
)
RULES: tuple[mapping.Rule, ...] = tuple(
    rule
    for source, target, kind in _MODULES
    for rule in (
        mapping.Rule(source + r'\.weight',
                     target + '.' + _LEAVES[kind][0], _LEAVES[kind][1]),
        mapping.Rule(source + r'\.bias', target + '.bias'),
    ))


def _to_numpy(value: Any) -> np.ndarray:
  # Checkpoints are often bfloat16 torch tensors, which np.asarray rejects;
  # upcast through torch's own `.float()` first.
  if hasattr(value, 'detach') and hasattr(value, 'float'):
    value = value.detach().float().cpu().numpy()
  return np.asarray(value, np.float32)


def vae_from_diffusers(state_dict: Mapping[str, Any],
                       config: Mapping[str, Any]) -> vae.AutoencoderKL:
  """Builds an `AutoencoderKL` from a diffusers checkpoint.

  Args:
    state_dict: diffusers AutoencoderKL parameter name -> array (numpy,
      torch tensor of any float dtype, or anything np.asarray takes).
    config: the diffusers config (`model.config` or config.json's dict).

  Returns:
    The model, with float32 parameters.

  Raises:
    ValueError: on an unsupported config, or listing every missing,
      unexpected and mis-shaped key of `state_dict`.
  """
  cfg = vae.AutoencoderKLConfig.from_diffusers(config)
  # Abstract model: the checkpoint provides every value, so no random init
  # (the FLUX VAE would spend seconds and 335 MB drawing weights it drops).
  model = nnx.eval_shape(lambda: vae.AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
  arrays = {name: _to_numpy(value) for name, value in state_dict.items()}
  return mapping.load(model, arrays, RULES)
