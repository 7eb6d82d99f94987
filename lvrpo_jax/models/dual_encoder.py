"""SigLIP-style image/text dual encoder: the frozen reward model.

The architecture of transformers' `SiglipModel`: an image tower (the ViT of
`vit.py` with its MAP head) and a text tower (token + learned position
embeddings, the same pre-LayerNorm blocks without any mask, a final
LayerNorm, and a linear head on the last token), plus the scalars
`logit_scale` (log of the temperature t) and `logit_bias` (b) of the sigmoid
loss.

Rewards (DESIGN.md section 6) read four features, all L2-normalized in the
shared D-dim space, so a dot product is a cosine similarity:
  - `embed_image` [B, D] and `embed_text` [B, D]: SiglipModel's
    `image_embeds` / `text_embeds`; `r_sem` is their dot product.
  - `image_patches` [B, N, D]: each patch token through the MAP head as if
    the probe attended to that patch alone (`vit.MAPHead.per_token`); the
    pooled embedding is the head's output on an attention-weighted mixture
    of exactly these per-patch inputs.
  - `text_tokens` [B, T, D]: the text head applied to every token (the
    pooled text embedding is this at the last position).
  `r_dense` = mean over prompt tokens of max over patches of
  text_tokens . image_patches; the caller masks padding and special tokens.

Text follows SigLIP's training convention: ids padded to a fixed length with
no attention mask (padding tokens are attended to) and the last position
pooled, which is usually padding; texts must be padded the same way here as
in training for embeddings to be comparable.

Shapes: B batch, T text tokens, N patches, D shared width, W text width,
V vocabulary.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lvrpo_jax.models import transformer
from lvrpo_jax.models import vit as vit_lib
from lvrpo_jax.sharding import logical

_init = nnx.initializers


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Text tower shapes; transformers' SiglipTextConfig names in comments."""
  vocab_size: int  # vocab_size
  max_len: int  # max_position_embeddings
  width: int  # hidden_size
  depth: int  # num_hidden_layers
  heads: int  # num_attention_heads
  mlp_dim: int  # intermediate_size
  projection_dim: int  # projection_size: the shared embedding width
  layer_norm_eps: float = 1e-6
  dtype: str = 'float32'  # Activations; parameters are always float32.

  def __post_init__(self):
    for name in ('vocab_size', 'max_len', 'width', 'depth', 'heads',
                 'mlp_dim', 'projection_dim'):
      if getattr(self, name) < 1:
        raise ValueError(f'TextConfig.{name} must be >= 1, got '
                         f'{getattr(self, name)}')
    if self.width % self.heads:
      raise ValueError(f'TextConfig.width={self.width} is not a multiple of '
                       f'heads={self.heads}')


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
  vision: vit_lib.ViTConfig
  text: TextConfig

  def __post_init__(self):
    if not self.vision.use_head:
      raise ValueError('DualEncoderConfig.vision.use_head must be True: the '
                       'image embedding is the MAP head output')
    if self.text.projection_dim != self.vision.width:
      raise ValueError(
          f'DualEncoderConfig.text.projection_dim={self.text.projection_dim}'
          f' must equal vision.width={self.vision.width} (the shared space)')


def with_dtype(config: DualEncoderConfig, dtype: str) -> DualEncoderConfig:
  """`config` with both towers computing in `dtype` (parameters float32)."""
  return dataclasses.replace(
      config, vision=dataclasses.replace(config.vision, dtype=dtype),
      text=dataclasses.replace(config.text, dtype=dtype))


def tiny() -> DualEncoderConfig:
  """The CPU world's reward model: world tokenizer (51 ids), 32x32 images,
  272 k params.

  16 positions hold the longest world prompt (10 words) with <bos>/<eos>.
  """
  return DualEncoderConfig(
      vision=vit_lib.tiny(),
      text=TextConfig(vocab_size=51, max_len=16, width=64, depth=2, heads=4,
                      mlp_dim=256, projection_dim=64))


def so400m_patch14(image_size: int = 384) -> DualEncoderConfig:
  """google/siglip-so400m-patch14-{224,384}: both towers so400m-shaped."""
  return DualEncoderConfig(
      vision=vit_lib.so400m_patch14(image_size),
      text=TextConfig(vocab_size=32_000, max_len=64, width=1152, depth=27,
                      heads=16, mlp_dim=4304, projection_dim=1152))


def check_ids(ids, config: TextConfig) -> jax.Array:
  """`ids` as a jax array, or a ValueError saying what is wrong with them."""
  return transformer.check_token_ids(ids, config.vocab_size, config.max_len)


class TextTower(nnx.Module):
  """SiglipTextModel: ids -> token states, and the projection head."""

  def __init__(self, config: TextConfig, *, rngs: nnx.Rngs):
    self.config = config
    w = config.width
    self.token_embed = nnx.Embed(
        config.vocab_size, w, dtype=config.dtype, rngs=rngs,
        embedding_init=logical(_init.normal(w ** -0.5), 'vocab', 'embed'))
    self.pos_embed = nnx.Param(logical(_init.normal(w ** -0.5), 'length',
                                       'embed')(
        rngs.params(), (config.max_len, w)))
    self.blocks = nnx.List([
        vit_lib.Block(w, config.heads, config.mlp_dim, config.layer_norm_eps,
                      dtype=config.dtype, rngs=rngs)
        for _ in range(config.depth)])
    self.final_norm = vit_lib.layer_norm(w, config.layer_norm_eps,
                                         config.dtype, rngs)
    # Both dimensions are model widths; only the input one is FSDP-sharded
    # (a mesh axis may appear once per parameter).
    self.head = nnx.Linear(
        w, config.projection_dim, dtype=config.dtype, rngs=rngs,
        kernel_init=logical(_init.lecun_normal(), 'embed', None),
        bias_init=logical(_init.zeros_init(), None))

  def __call__(self, ids_bt):
    """Token states [B, T, W] after the final LayerNorm (no mask, no
    causality: SigLIP's text encoder is bidirectional).

    Raises:
      ValueError: for a wrong rank, dtype, length or (concrete) id range.
    """
    ids_bt = check_ids(ids_bt, self.config)
    x_btw = self.token_embed(ids_bt)
    x_btw = x_btw + self.pos_embed[:ids_bt.shape[1]].astype(x_btw.dtype)
    for block in self.blocks:
      x_btw = block(x_btw)
    return self.final_norm(x_btw)


def _normalize(x):
  # As torch's F.normalize: an all-zero vector stays zero instead of NaN.
  # In float32 whatever the compute dtype: these are the model's outputs.
  x = x.astype(jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, 1e-12)


class DualEncoder(nnx.Module):
  """SigLIP image/text dual encoder; every output is L2-normalized."""

  def __init__(self, config: DualEncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.vision = vit_lib.ViT(config.vision, rngs=rngs)
    self.text = TextTower(config.text, rngs=rngs)
    # SigLIP's initialization (Zhai et al. 2023, section 3.2): t = 10 and
    # b = -10, so that the many negatives start with a small loss.
    self.logit_scale = nnx.Param(logical(_init.constant(math.log(10.0)))(
        rngs.params(), ()))
    self.logit_bias = nnx.Param(logical(_init.constant(-10.0))(
        rngs.params(), ()))

  def embed_image(self, pixels_bhwc):
    """Unit-norm image embeddings [B, D] (SiglipModel's `image_embeds`).

    Args:
      pixels_bhwc: [B, R, R, C] floating point in [-1, 1].
    """
    return _normalize(self.vision.pool(self.vision(pixels_bhwc)))

  def embed_text(self, ids_bt):
    """Unit-norm text embeddings [B, D] (SiglipModel's `text_embeds`).

    Args:
      ids_bt: [B, T] int token ids, T <= max_len, padded as in training.
    """
    return _normalize(self.text.head(self.text(ids_bt)[:, -1]))

  def image_patches(self, pixels_bhwc):
    """Unit-norm per-patch features [B, N, D] in the embedding space.

    See the module docstring and `vit.MAPHead.per_token`.
    """
    return _normalize(self.vision.pool_tokens(self.vision(pixels_bhwc)))

  def text_tokens(self, ids_bt):
    """Unit-norm per-token features [B, T, D] (the text head at every
    position; `text_tokens(ids)[:, -1] == embed_text(ids)`)."""
    return _normalize(self.text.head(self.text(ids_bt)))


def siglip_loss(img_emb_bd, txt_emb_bd, logit_scale, logit_bias,
                positives_bb=None):
  """The sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image
  Pre-Training", eq. 1):

    L = -1/|B| sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)),

  with t = exp(logit_scale), z_ij = 1 if i == j (a matching pair) else -1.

  Args:
    img_emb_bd: image embeddings x [B, D], L2-normalized (as `embed_image`).
    txt_emb_bd: text embeddings y [B, D] of the same B pairs, normalized.
    logit_scale: scalar log t.
    logit_bias: scalar b.
    positives_bb: bool [B, B], which (image, text) pairs match; default the
      diagonal. With a closed vocabulary two images in a batch often share
      a caption word for word, and each matches the other's text too.

  Returns:
    Scalar loss, summed over each image's B texts, averaged over images (as
    transformers' SiglipModel `return_loss=True`).
  """
  logits_bb = (jnp.einsum('id,jd->ij', img_emb_bd, txt_emb_bd) *
               jnp.exp(logit_scale) + logit_bias)
  b = logits_bb.shape[0]
  if positives_bb is None:
    positives_bb = jnp.eye(b, dtype=bool)
  z_bb = 2.0 * positives_bb.astype(logits_bb.dtype) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(z_bb * logits_bb)) / b
