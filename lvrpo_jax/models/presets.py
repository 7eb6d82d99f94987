"""Model presets: `tiny` for a CPU and `bagel_7b` for BAGEL-7B-MoT shapes.

  tiny      ~1-5 M parameters; 32x32 world images; the light f8 autoencoder
            with 8 latent channels and latent patch 1, i.e. 16 latent tokens
            (the layout DESIGN §7 measured to learn in minutes on 2 cores).
  bagel_7b  Qwen2.5-7B backbone with two experts, SigLIP-so400m/14 ViT, FLUX
            VAE (16 latent channels, 8x down) with latent patch 2 at 512 px,
            and BAGEL's conventions (what `convert.unified_from_bagel`
            builds for BAGEL-7B-MoT). Built with jax.eval_shape only on
            small machines.

`from_config(config.model)` is what the stages call: the preset, with the
unified model computing in `config.model.dtype` ('bfloat16' is mixed
precision: float32 parameters, bfloat16 activations and matmuls).
"""

import dataclasses

from lvrpo_jax.models import vae
from lvrpo_jax.models import vit
from lvrpo_jax.models.transformer import TransformerConfig
from lvrpo_jax.models.unified import UnifiedConfig
from lvrpo_jax.world import tokenizer


def tiny() -> tuple[UnifiedConfig, vae.LightAutoencoderConfig]:
  """(unified model, autoencoder) configs for the 32x32 shapes world."""
  ae = vae.tiny()
  text = TransformerConfig(
      vocab_size=tokenizer.Tokenizer().vocab_size, hidden_size=128,
      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
      intermediate_size=384, rope_theta=10_000.0, qk_norm=True, max_len=128)
  vision = vit.ViTConfig(image_size=32, patch_size=8, width=64, depth=2,
                         heads=4, mlp_dim=256, use_head=False)
  # vit_pos_embed: each patch's grid position in its image token. Without
  # it the model cannot read an object's grid cell, which the relations'
  # rationale answers spell out (README, "Can the model learn relations?").
  return UnifiedConfig(text=text, vit=vision,
                       latent_channels=ae.latent_channels,
                       latent_size=32 // ae.downsample_factor, latent_patch=1,
                       timestep_shift=1.0, vit_pos_embed=True), ae


def micro() -> UnifiedConfig:
  """A 2-layer, width-32 unified model with a 4 x 4 x 4 latent grid: every
  code path of `tiny`, compiled in a fraction of the time (tests)."""
  text = TransformerConfig(
      vocab_size=tokenizer.Tokenizer().vocab_size, hidden_size=32,
      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
      intermediate_size=64, max_len=64, qk_norm=True)
  vision = vit.ViTConfig(image_size=32, patch_size=8, width=32, depth=1,
                         heads=2, mlp_dim=64, use_head=False)
  return UnifiedConfig(text=text, vit=vision, latent_channels=4,
                       latent_size=4, latent_patch=1, timestep_shift=2.0,
                       vit_pos_embed=True)


# BAGEL's special tokens in the Qwen2.5 vocabulary (its data_utils'
# `add_special_tokens`: <|im_start|>, <|im_end|>, <|vision_start|>,
# <|vision_end|>; padding <|endoftext|>).
BAGEL_TOKEN_IDS = dict(bos_token_id=151_644, eos_token_id=151_645,
                       start_of_image=151_652, end_of_image=151_653,
                       pad_token_id=151_643)


def bagel_7b() -> tuple[UnifiedConfig, vae.AutoencoderKLConfig]:
  """BAGEL-7B-MoT shapes (Qwen2.5-7B config.json; SigLIP so400m/14; FLUX)."""
  text = TransformerConfig(
      vocab_size=152_064, hidden_size=3584, num_layers=28, num_heads=28,
      num_kv_heads=4, head_dim=128, intermediate_size=18_944,
      rope_theta=1_000_000.0, rms_norm_eps=1e-6, qk_norm=True,
      tie_embeddings=False, max_len=32_768)
  # BAGEL loads so400m's 27 layers minus the last (its app.py).
  vision = vit.ViTConfig(image_size=980, patch_size=14, width=1152, depth=26,
                         heads=16, mlp_dim=4304, use_head=False)
  ae = vae.flux()
  return UnifiedConfig(text=text, vit=vision, latent_channels=16,
                       latent_size=64, latent_patch=2,
                       timestep_shift=3.0, vit_pos_embed=True,
                       time_freq_dim=256, time_scale=1.0, sincos_w_first=True,
                       image_positions='shared', image_brackets=True,
                       **bagel_special_tokens(BAGEL_TOKEN_IDS)), ae


def bagel_special_tokens(token_ids) -> dict[str, int]:
  """UnifiedConfig's token fields from BAGEL's `new_token_ids` dict (plus
  `pad_token_id`)."""
  return dict(bos=token_ids['bos_token_id'], eos=token_ids['eos_token_id'],
              boi=token_ids['start_of_image'], eoi=token_ids['end_of_image'],
              pad=token_ids['pad_token_id'])


PRESETS = {'tiny': tiny, 'bagel_7b': bagel_7b}
DTYPES = ('float32', 'bfloat16')


def with_dtype(cfg: UnifiedConfig, dtype: str) -> UnifiedConfig:
  """`cfg` computing in `dtype` (backbone, ViT and the model's own layers);
  parameters stay float32."""
  if dtype not in DTYPES:
    raise ValueError(f'dtype {dtype!r}; one of {DTYPES}')
  return dataclasses.replace(
      cfg, text=dataclasses.replace(cfg.text, dtype=dtype),
      vit=dataclasses.replace(cfg.vit, dtype=dtype))


def from_config(model_config):
  """(unified, autoencoder) configs of a config's `model` section."""
  ucfg, ae = PRESETS[model_config.preset]()
  ucfg = dataclasses.replace(ucfg, text=dataclasses.replace(
      ucfg.text, scan_layers=model_config.scan_layers,
      remat=model_config.remat, remat_policy=model_config.remat_policy))
  return with_dtype(ucfg, model_config.dtype), ae
