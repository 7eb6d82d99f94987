"""Autoencoder state dicts -> `vae.AutoencoderKL`.

  vae = vae_from_diffusers(state_dict, config)   # diffusers AutoencoderKL
  vae = vae_from_flux(state_dict, params)        # FLUX / LDM `ae.safetensors`

Our parameter paths mirror diffusers' module names, so the table mostly
renames leaves (weight -> kernel / scale) and transposes; the exceptions are
the one-element ModuleLists (`downsamplers.0`, `upsamplers.0`,
`attentions.0`, `to_out.0`) that our modules hold as single attributes.
FLUX's original autoencoder (black-forest-labs' `ae.safetensors`, the one
BAGEL ships) uses the LDM names; they are renamed to diffusers' first
(`flux_to_diffusers_names`), as diffusers' own single-file loader does.
"""

import re
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
                       config: Mapping[str, Any],
                       mesh=None) -> vae.AutoencoderKL:
  """Builds an `AutoencoderKL` from a diffusers checkpoint.

  Args:
    state_dict: diffusers AutoencoderKL parameter name -> array (numpy,
      torch tensor of any float dtype, or anything np.asarray takes).
    config: the diffusers config (`model.config` or config.json's dict).
    mesh: place every parameter sharded over this ('data', 'fsdp',
      'tensor') mesh by its logical axes (default: the default device).

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
  return mapping.load(model, arrays, RULES, mesh=mesh)


# LDM / FLUX module names -> diffusers', by regex; `{up}` is the decoder
# level in diffusers' order (LDM counts decoder levels from the lowest
# resolution up, diffusers from the highest down).
_FLUX_RENAMES = (
    (r'(encoder|decoder)\.mid\.block_(\d)\.', None),
    (r'(encoder|decoder)\.mid\.attn_1\.norm\.',
     '{0}.mid_block.attentions.0.group_norm.'),
    (r'(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.',
     '{0}.mid_block.attentions.0.to_{1}.'),
    (r'(encoder|decoder)\.mid\.attn_1\.proj_out\.',
     '{0}.mid_block.attentions.0.to_out.0.'),
    (r'encoder\.down\.(\d+)\.block\.(\d+)\.',
     'encoder.down_blocks.{0}.resnets.{1}.'),
    (r'encoder\.down\.(\d+)\.downsample\.',
     'encoder.down_blocks.{0}.downsamplers.0.'),
    (r'decoder\.up\.(\d+)\.block\.(\d+)\.',
     'decoder.up_blocks.{up}.resnets.{1}.'),
    (r'decoder\.up\.(\d+)\.upsample\.',
     'decoder.up_blocks.{up}.upsamplers.0.'),
    (r'(encoder|decoder)\.norm_out\.', '{0}.conv_norm_out.'),
)


def flux_to_diffusers_names(state_dict: Mapping[str, Any], levels: int
                            ) -> dict[str, np.ndarray]:
  """An LDM / FLUX autoencoder state dict under diffusers' names; the mid
  attention's 1x1 convolutions [C, C, 1, 1] become Linear weights [C, C].
  Names it does not know are kept, so the load reports them."""
  out = {}
  for name, value in state_dict.items():
    value = _to_numpy(value)
    new = name.replace('nin_shortcut', 'conv_shortcut')
    for pattern, target in _FLUX_RENAMES:
      match = re.match(pattern, new)
      if match is None:
        continue
      if target is None:  # mid.block_1 / block_2 -> mid_block.resnets.0 / 1
        target = '{0}.mid_block.resnets.' + str(int(match[2]) - 1) + '.'
      up = (levels - 1 - int(match[1]) if new.startswith('decoder.up.')
            else None)
      new = target.format(*match.groups(), up=up) + new[match.end():]
      if '.attentions.0.' in new and value.ndim == 4:
        value = value[:, :, 0, 0]
      break
    out[new] = value
  return out


def vae_from_flux(state_dict: Mapping[str, Any],
                  params: Mapping[str, Any],
                  mesh=None) -> vae.AutoencoderKL:
  """Builds an `AutoencoderKL` from FLUX's original autoencoder.

  Args:
    state_dict: `ae.safetensors` names (encoder.down.0.block.0.conv1, ...)
      -> arrays.
    params: FLUX's AutoEncoderParams as a dict: ch, ch_mult,
      num_res_blocks, z_channels, scale_factor, shift_factor (in_channels
      and out_ch default to 3; downsample, if given, must agree with
      ch_mult; resolution is not used).
    mesh: place every parameter sharded over this ('data', 'fsdp',
      'tensor') mesh by its logical axes (default: the default device).

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped key, or
      for inconsistent params.
  """
  ch_mult = tuple(params['ch_mult'])
  down = params.get('downsample', 2 ** (len(ch_mult) - 1))
  if down != 2 ** (len(ch_mult) - 1):
    raise ValueError(f'downsample={down} does not match ch_mult={ch_mult} '
                     f'(2^{len(ch_mult) - 1})')
  config = {
      'in_channels': params.get('in_channels', 3),
      'out_channels': params.get('out_ch', 3),
      'down_block_types': ('DownEncoderBlock2D',) * len(ch_mult),
      'up_block_types': ('UpDecoderBlock2D',) * len(ch_mult),
      'block_out_channels': tuple(params['ch'] * m for m in ch_mult),
      'layers_per_block': params['num_res_blocks'],
      'latent_channels': params['z_channels'],
      'scaling_factor': params['scale_factor'],
      'shift_factor': params['shift_factor'],
      'use_quant_conv': False, 'use_post_quant_conv': False}
  return vae_from_diffusers(flux_to_diffusers_names(state_dict, len(ch_mult)),
                            config, mesh)
