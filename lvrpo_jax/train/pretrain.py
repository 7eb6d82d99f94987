"""The `pretrain` stage: the unified-pretraining baseline LVRPO starts from.

Every batch mixes both tasks on the train split only:
  understanding  [bos] [vit tokens] [text]: next-token loss on the answer to
                 the example's question (even indices) or on its caption
                 (odd indices), the prompt tokens unscored;
  generation     [bos] [prompt] [boi] [latents]: the rectified-flow loss on
                 the frozen `vae` stage's latents of the same image, the
                 prompt dropped (all <pad>) with probability `prompt_dropout`
                 so classifier-free guidance has an unconditional model.
Loss = text CE + `flow_weight` x flow MSE, per example.
"""

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvrpo_jax import configs
from lvrpo_jax.data import pipeline
from lvrpo_jax.models import presets
from lvrpo_jax.models import unified
from lvrpo_jax.models import vae as vae_lib
from lvrpo_jax.train import autoencoder
from lvrpo_jax.train import stages
from lvrpo_jax.world import questions as questions_lib
from lvrpo_jax.world import stage as world_stage
from lvrpo_jax.world import tokenizer as tok

TEXT_LEN = 16  # question + answer + <eos>, or caption + <eos>
PROMPT_LEN = 16


class PretrainExamples(grain.transforms.Map):
  """Record -> {'index', 'image', 'text' [T], 'target' [T], 'prompt' [P]}.

  With `rationale` (`data.answer_rationale`), an answer is taught after its
  question's rationale, if it has one (world/questions.py).
  """

  def __init__(self, text_len: int = TEXT_LEN, prompt_len: int = PROMPT_LEN,
               rationale: bool = True):
    self.text_len, self.prompt_len = text_len, prompt_len
    self.rationale = rationale
    self.tokenizer = tok.Tokenizer()

  def map(self, record):
    encode = self.tokenizer.encode
    if int(record['index']) % 2 == 0:
      # A record without the field (made by hand) has no rationale.
      rationale = record.get('rationale', '') if self.rationale else ''
      context = encode(record['question'])
      answer = encode(questions_lib.reply(record['answer'], rationale))
    else:
      context, answer = [], encode(record['caption'])
    ids = context + answer + [tok.EOS]
    if len(ids) > self.text_len:
      raise ValueError(f'{len(ids)} text tokens exceed {self.text_len}')
    pad = self.text_len - len(ids)
    target = [0] * len(context) + [1] * (len(answer) + 1) + [0] * pad
    prompt = encode(record['prompt'])
    return {'index': np.int32(record['index']), 'image': record['image'],
            'text': np.array(ids + [tok.PAD] * pad, np.int32),
            'target': np.array(target, np.int32),
            'prompt': np.array([tok.PAD] * (self.prompt_len - len(prompt))
                               + prompt, np.int32)}


def text_loss(model, pixels, text, target):
  """The understanding half of the loss as (sum, count): next-token CE of
  `text` [B, T] given the image `pixels` [B, H, W, 3] in [-1, 1], on the
  tokens `target` [B, T] marks (`PretrainExamples`' layout)."""
  logits = model.understanding_logits(pixels, text)
  return unified.text_loss(logits[:, :-1], text[:, 1:], target[:, 1:])


def pretrain_loss(model, batch, rng, *, encode, flow_weight: float,
                  prompt_dropout: float):
  """(per-example loss summed, (examples, aux)); `encode` maps pixels to the
  frozen autoencoder's normalized latents."""
  pixels = vae_lib.from_uint8(batch['image'])
  text = batch['text']
  text_sum, text_n = text_loss(model, pixels, text, batch['target'])
  latents = jax.lax.stop_gradient(encode(pixels))
  # Keyed by example id, not batch row: see unified.example_keys.
  drop_keys, flow_keys = jnp.moveaxis(jax.vmap(jax.random.split)(
      unified.example_keys(rng, batch['index'])), 1, 0)
  drop = jax.vmap(jax.random.uniform)(drop_keys) < prompt_dropout
  prompt = jnp.where(drop[:, None], tok.PAD, batch['prompt'])
  flow_sum, flow_n = unified.flow_loss(model, prompt, latents, flow_keys)
  text_mean = text_sum / jnp.maximum(text_n, 1.0)
  flow_mean = flow_sum / flow_n
  b = jnp.asarray(text.shape[0], jnp.float32)
  return ((text_mean + flow_weight * flow_mean) * b,
          (b, {'text_loss': text_mean, 'flow_loss': flow_mean}))


def pretrain_loss_of(section, ae):
  """`pretrain_loss` with the settings of `section` (config.pretrain) and
  the frozen autoencoder `ae`: (model, batch, rng) -> (loss_sum, (count,
  aux))."""
  ae_graph, ae_state = nnx.split(ae)

  def encode(pixels):
    model = nnx.merge(ae_graph, ae_state)
    return model.normalize_latents(model.encode(pixels)[0])

  return lambda model, batch, rng: pretrain_loss(
      model, batch, rng, encode=encode, flow_weight=section.flow_weight,
      prompt_dropout=section.prompt_dropout)


def run_pretrain(config, workdir: str) -> None:
  """Trains the baseline (or resumes, or skips); needs a complete `vae`."""
  train_baseline(config, workdir)


def run_sft_continue(config, workdir: str) -> None:
  """The equal-compute supervised baseline: pretraining continued from the
  baseline's parameters for `sft_continue.steps` more steps."""
  train_sft_continue(config, workdir)


def train_baseline(config, workdir: str, require_complete: bool = False):
  """The stage's loop: trains, resumes or (when complete) just restores the
  baseline; with `require_complete` an unfinished stage is an error."""
  return _train_unified('pretrain', config, workdir, require_complete)


def train_sft_continue(config, workdir: str, require_complete: bool = False):
  """`train_baseline` for stage `sft_continue`, which starts from the
  complete `pretrain` stage's parameters and optimizes the same loss on the
  same data with the settings of `config.sft_continue`."""
  return _train_unified(
      'sft_continue', config, workdir, require_complete,
      init_from=lambda: train_baseline(config, workdir,
                                       require_complete=True))


def _train_unified(name: str, config, workdir: str, require_complete: bool,
                   init_from=None):
  section = config.pretrain
  world, sizes = world_stage.world_and_sizes(config)
  data_dir = configs.world_data_dir(config, workdir)
  train = pipeline.open_split(world, sizes, data_dir, 'train')
  ae = autoencoder.train_autoencoder(config, workdir, require_complete=True)
  ucfg, _ = presets.from_config(config.model)
  return stages.run(
      name, config, workdir,
      make_model=lambda: unified.UnifiedModel(ucfg,
                                              rngs=nnx.Rngs(config.seed)),
      loss_fn=pretrain_loss_of(section, ae),
      source=train, transform=PretrainExamples(
          rationale=config.data.answer_rationale),
      tokens_per_step=config[name].batch_size * (
          2 + ucfg.vit.num_patches + TEXT_LEN + PROMPT_LEN +
          ucfg.num_latent_tokens), require_complete=require_complete,
      init_from=init_from)
