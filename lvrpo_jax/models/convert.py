"""Checkpoint import: the public API for loading real weights.

  mot = convert.mot_from_qwen2(state_dict, config)   # transformers Qwen2
  vit = convert.vit_from_siglip(state_dict, config)  # SiglipVisionModel
  enc = convert.dual_encoder_from_siglip(state_dict, config)  # SiglipModel
  vae = convert.vae_from_diffusers(state_dict, config)  # AutoencoderKL
  vae = convert.vae_from_flux(state_dict, params)  # FLUX's ae.safetensors
  model = convert.unified_from_bagel(state_dict, config, image_size)  # BAGEL
  model, vae = convert.load_bagel(model_dir)  # BAGEL's Hugging Face dir

`state_dict` maps the reference implementation's parameter names to numpy
arrays; `config` is its config as a dict. Each mapping is a table of
`mapping.Rule`s; a state dict that does not fit (missing, unexpected or
mis-shaped keys) is rejected with one ValueError listing them all.
"""

from lvrpo_jax.models.convert_bagel import load_bagel
from lvrpo_jax.models.convert_bagel import unified_from_bagel
from lvrpo_jax.models.convert_qwen2 import QWEN2_RULES
from lvrpo_jax.models.convert_qwen2 import mot_from_qwen2
from lvrpo_jax.models.convert_qwen2 import qwen2_config
from lvrpo_jax.models.convert_siglip import dual_encoder_from_siglip
from lvrpo_jax.models.convert_siglip import vit_from_siglip
from lvrpo_jax.models.convert_vae import vae_from_diffusers
from lvrpo_jax.models.convert_vae import vae_from_flux

__all__ = ['mot_from_qwen2', 'vit_from_siglip', 'dual_encoder_from_siglip',
           'vae_from_diffusers', 'vae_from_flux', 'unified_from_bagel',
           'load_bagel', 'QWEN2_RULES', 'qwen2_config']
