"""Model presets: the tiny CPU model and BAGEL-7B-MoT shapes (no weights)."""

import jax
import pytest
from flax import nnx

from lvrpo_jax.models import presets
from lvrpo_jax.models import unified

# Qwen2.5-7B (its config.json), counted by hand:
#   embeddings and LM head  2 x 152064 x 3584            = 1,089,994,752
#   one layer: q 3584*3584 + 3584, k and v 3584*512 + 512 each,
#              o 3584*3584, MLP 3 * 3584 * 18944, 2 norms of 3584
#                                                          =   233,057,792
#   28 layers + final norm (3584)  -> 7,615,616,512, Qwen2.5-7B's size.
QWEN25_7B = 7_615_616_512
QWEN25_7B_LAYER = 233_057_792
QK_NORMS = 2 * 128  # Per expert and layer (BAGEL adds QK-norm).


def _count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(tree, nnx.Param)))


def test_tiny_is_cpu_sized():
  cfg, ae = presets.tiny()
  model = nnx.eval_shape(lambda: unified.UnifiedModel(cfg, rngs=nnx.Rngs(0)))
  assert 1_000_000 <= _count(model) <= 5_000_000
  # f8 light autoencoder, latent patch 1: one latent token per grid cell.
  assert (cfg.latent_size, cfg.latent_patch, cfg.num_latent_tokens) == (
      4, 1, 16)
  assert cfg.latent_channels == ae.latent_channels == 8


@pytest.mark.slow  # ~17 s of tracing 14.6 B parameters' initializers.
def test_bagel_7b_shapes_without_allocating():
  cfg, ae = presets.bagel_7b()
  model = nnx.eval_shape(lambda: unified.UnifiedModel(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  layers = cfg.text.num_layers
  gen_expert = sum(_count(layer.gen) for layer in model.mot.layers)
  assert gen_expert == layers * (QWEN25_7B_LAYER + QK_NORMS)
  # Active per text token: one expert's path is exactly Qwen2.5-7B (plus
  # BAGEL's QK-norms and the generation expert's own final norm).
  language = _count(model.mot)
  active = language - gen_expert - cfg.text.hidden_size
  assert active == QWEN25_7B + layers * QK_NORMS
  # Both experts: BAGEL-7B-MoT's "14B total, 7B active".
  assert abs(language / 14e9 - 1) < 0.02, language
  total = _count(model)
  print(f'\nbagel_7b: {total:,} parameters in all (language {language:,}, '
        f'active per text token {active:,}, ViT {_count(model.vit):,})')
  # Adapters: connector 1152*3584 + 3584 and 3584^2 + 3584; timestep MLP
  # 256*3584 + 3584 and 3584^2 + 3584; latent in 64*3584 + 3584, velocity
  # out 3584*64 + 64.
  assert total - language - _count(model.vit) == 31_213_120
  assert ae.latent_channels == 16 and cfg.num_latent_tokens == 32 * 32
