"""The `reward_model` stage: the SigLIP-style dual encoder behind r_sem and
r_dense, trained with the sigmoid loss on (image, caption) pairs.

It sees every composition — the train split and the held-out one — since a
reward model may know more than the policy it judges (SigLIP was trained on
far more than BAGEL). Two images of a batch whose captions are the same
words are both positives for that caption.

Evaluated on the test split: for each image, its caption against 15 other
distinct test captions; the share of images ranking their own caption first
(`workdir/reward_model/eval.json`).
"""

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvrpo_jax import configs
from lvrpo_jax.data import pipeline
from lvrpo_jax.models import dual_encoder as dual_lib
from lvrpo_jax.models import vae as vae_lib
from lvrpo_jax.train import stages
from lvrpo_jax.world import stage as world_stage
from lvrpo_jax.world import tokenizer as tok


class CaptionPairs(grain.transforms.Map):
  """{'image', 'caption' ids [L]}; module level for worker processes."""

  def __init__(self, length: int):
    self.length = length
    self.tokenizer = tok.Tokenizer()

  def map(self, record):
    return {'image': record['image'],
            'caption': self.tokenizer.encode_padded(record['caption'],
                                                    self.length)}


class Concatenated:
  """Random access over several sources, one after another."""

  def __init__(self, *sources):
    self.sources = sources
    self.offsets = np.cumsum([0] + [len(s) for s in sources])

  def __len__(self):
    return int(self.offsets[-1])

  def __getitem__(self, index):
    part = int(np.searchsorted(self.offsets, index, side='right')) - 1
    return self.sources[part][index - int(self.offsets[part])]


def rm_loss(model, batch, rng):
  """(sigmoid loss x images, (images, aux)) of one batch."""
  del rng
  img = model.embed_image(vae_lib.from_uint8(batch['image']))
  txt = model.embed_text(batch['caption'])
  ids = batch['caption']
  positives = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
  loss = dual_lib.siglip_loss(img, txt, model.logit_scale[...],
                              model.logit_bias[...], positives)
  b = jnp.asarray(ids.shape[0], jnp.float32)
  return loss * b, (b, {'positives_per_image': positives.sum(1).mean()})


def train_reward_model(config, workdir: str, require_complete: bool = False):
  """The stage's loop: trains, resumes or (when complete) just restores the
  dual encoder; with `require_complete` an unfinished stage is an error."""
  world, sizes = world_stage.world_and_sizes(config)
  data_dir = configs.world_data_dir(config, workdir)
  source = Concatenated(*(pipeline.open_split(world, sizes, data_dir, split)
                          for split in ('train', 'heldout')))
  enc_cfg = dual_lib.with_dtype(dual_lib.tiny(), config.model.dtype)
  return stages.run(
      'reward_model', config, workdir,
      make_model=lambda: dual_lib.DualEncoder(enc_cfg,
                                              rngs=nnx.Rngs(config.seed)),
      loss_fn=rm_loss, source=source,
      transform=CaptionPairs(enc_cfg.text.max_len),
      tokens_per_step=config.reward_model.batch_size,
      require_complete=require_complete)


def run_reward_model(config, workdir: str) -> None:
  """Trains the dual encoder (or resumes, or skips) and evaluates it."""
  section = config.reward_model
  world, sizes = world_stage.world_and_sizes(config)
  data_dir = configs.world_data_dir(config, workdir)
  model = train_reward_model(config, workdir)
  length = model.config.text.max_len
  test = pipeline.open_split(world, sizes, data_dir, 'test')
  results = caption_ranking(model, test, section.eval_examples,
                            section.eval_candidates, length, config.seed)
  with open(os.path.join(workdir, 'reward_model', 'eval.json'), 'w') as f:
    json.dump(results, f, indent=2)
  print(f"  reward_model: right caption ranked first for "
        f"{results['top1']:.1%} of {results['images']} test images among "
        f"{results['candidates']} captions", flush=True)


def caption_ranking(model, source, num: int, candidates: int, length: int,
                    seed: int) -> dict:
  """Top-1 accuracy of each image's caption among `candidates` distinct
  captions of the same split (its own and others drawn at random)."""
  num = min(num, len(source))
  records = [source[i] for i in range(num)]
  captions = sorted({r['caption'].decode() for r in records})
  if len(captions) < candidates:
    raise ValueError(f'{len(captions)} distinct captions in {num} test '
                     f'examples; need {candidates}')
  tokenizer = tok.Tokenizer()
  ids = np.stack([tokenizer.encode_padded(c, length) for c in captions])
  images = np.stack([r['image'] for r in records])
  graphdef, state = nnx.split(model)
  embed = jax.jit(lambda s, x, t: (
      nnx.merge(graphdef, s).embed_image(vae_lib.from_uint8(x)),
      nnx.merge(graphdef, s).embed_text(t)))
  img, txt = (np.asarray(a) for a in embed(state, images, ids))
  sims = img @ txt.T  # [images, captions]
  rng = np.random.default_rng(seed)
  correct = 0
  for i, record in enumerate(records):
    own = captions.index(record['caption'].decode())
    others = rng.choice([c for c in range(len(captions)) if c != own],
                        candidates - 1, replace=False)
    # Strictly above every other: a collapsed model (all ties) scores 0.
    correct += int(sims[i, own] > sims[i, others].max())
  return {'images': num, 'candidates': candidates, 'top1': correct / num}
