r"""Text -> images from a trained checkpoint.

  python -m lvrpo_jax.generate --checkpoint=runs/default/lvrpo \
      --prompts=prompts.txt --out=images/ [--num_per_prompt=4] [--seed=0]

`--checkpoint` is a stage directory with a unified model (`pretrain` = the
baseline, `sft_continue`, `lvrpo`); `--prompts` has one prompt per line in
the shapes world's language (e.g. "a red circle left of a blue square").
Writes OUT/<line index>_<k>.png for k < num_per_prompt, sampled with the
checkpoint's eval settings (Euler ODE, `eval.sample_steps`,
`eval.guidance`) unless --steps / --guidance say otherwise. A bad line (a
word outside the vocabulary, too long) is reported with its line number
before anything is generated.
"""

import os
import sys

import jax
import numpy as np
from absl import app
from absl import flags
from flax import nnx
from PIL import Image

from lvrpo_jax.models import sampling
from lvrpo_jax.train import pretrain
from lvrpo_jax.train import trained
from lvrpo_jax.world import tokenizer as tok


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so the
  module imports anywhere)."""
  flags.DEFINE_string('checkpoint', None, 'Stage directory.', required=True)
  flags.DEFINE_string('prompts', None, 'One prompt per line.', required=True)
  flags.DEFINE_string('out', None, 'Output directory.', required=True)
  flags.DEFINE_integer('num_per_prompt', 4, 'Images per prompt.',
                       lower_bound=1)
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_integer('steps', None, 'ODE steps (eval.sample_steps).',
                       lower_bound=1)
  flags.DEFINE_float('guidance', None, 'CFG scale (eval.guidance).')
  flags.DEFINE_integer('batch_size', 64, 'Images per forward pass.',
                       lower_bound=1)


def read_prompts(path: str) -> np.ndarray:
  """Prompt tokens [lines, PROMPT_LEN], left-padded.

  Raises:
    ValueError: naming the file and line of an unusable prompt.
  """
  tokenizer = tok.Tokenizer()
  with open(path) as f:
    lines = f.read().splitlines()
  if not lines:
    raise ValueError(f'{path}: no prompts')
  rows = []
  for i, line in enumerate(lines):
    try:
      if not line.strip():
        raise ValueError('empty prompt')
      rows.append(tokenizer.encode_padded(line, pretrain.PROMPT_LEN,
                                          left=True))
    except ValueError as e:
      raise ValueError(f'{path}:{i + 1}: {e}') from None
  return np.asarray(rows, np.int32)


def generate(model, ae, prompts_lp, *, num_per_prompt: int, seed: int,
             steps: int, guidance: float, batch_size: int) -> np.ndarray:
  """uint8 images [L, K, H, W, 3]; image (l, k) is sampled from key
  fold_in(seed, l * K + k), so it does not depend on the batch size."""
  graphdef, state = nnx.split(model)
  ae_graph, ae_state = nnx.split(ae)

  @jax.jit
  def sample(state, ae_state, prompts, ids):
    m, decoder = nnx.merge(graphdef, state), nnx.merge(ae_graph, ae_state)

    def one(prompt, i):
      key = jax.random.fold_in(jax.random.key(seed), i)
      return sampling.generate_images(m, decoder, prompt[None], key, steps,
                                      guidance)[0]
    return jax.vmap(one)(prompts, ids)

  rows = np.repeat(prompts_lp, num_per_prompt, axis=0)
  ids = np.arange(len(rows), dtype=np.int32)
  out = []
  for start in range(0, len(rows), batch_size):
    chunk, chunk_ids = rows[start:start + batch_size], ids[start:start +
                                                           batch_size]
    pad = batch_size - len(chunk)  # One compiled shape.
    images = sample(state, ae_state, np.concatenate(
        [chunk, np.repeat(chunk[:1], pad, 0)]), np.concatenate(
            [chunk_ids, np.repeat(chunk_ids[:1], pad, 0)]))
    out.append(np.asarray(images)[:len(chunk)])
  images = np.concatenate(out)
  return images.reshape(len(prompts_lp), num_per_prompt, *images.shape[1:])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  try:
    prompts = read_prompts(args.prompts)
    config, model, ae = trained.load(args.checkpoint)
  except (OSError, ValueError) as e:
    sys.stderr.write(f'generate: {e}\n')
    sys.exit(1)
  images = generate(
      model, ae, prompts, num_per_prompt=args.num_per_prompt,
      seed=args.seed, steps=args.steps or config.eval.sample_steps,
      guidance=(config.eval.guidance if args.guidance is None
                else args.guidance), batch_size=args.batch_size)
  os.makedirs(args.out, exist_ok=True)
  for line, per_prompt in enumerate(images):
    for k, image in enumerate(per_prompt):
      Image.fromarray(image).save(os.path.join(args.out, f'{line}_{k}.png'))
  print(f'wrote {images.shape[0] * images.shape[1]} images to {args.out}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
