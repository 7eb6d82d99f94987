r"""(image, question) -> answer from a trained checkpoint.

  python -m lvrpo_jax.answer --checkpoint=runs/default/lvrpo \
      --questions=questions.jsonl --out=answers.jsonl

`--questions` is JSONL, one `{"image": PATH, "question": STR}` per line
(a relative PATH is taken from the JSONL file's directory); images are RGB
at the world's image size. Writes the same objects with `"answer"` added
(greedy decoding, one word) and, where the model spelled one out first,
its `"rationale"` (relations: the two objects' grid cells, row and column,
as number words; world/questions.py). A bad line (unreadable image, wrong
size, a word outside the vocabulary) is reported with its line number
before anything is answered.
"""

import json
import os
import sys

import jax
import numpy as np
from absl import app
from absl import flags
from flax import nnx
from PIL import Image

from lvrpo_jax.models import sampling
from lvrpo_jax.models import vae as vae_lib
from lvrpo_jax.train import trained
from lvrpo_jax.world import questions as questions_lib
from lvrpo_jax.world import tokenizer as tok


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so the
  module imports anywhere)."""
  flags.DEFINE_string('checkpoint', None, 'Stage directory.', required=True)
  flags.DEFINE_string('questions', None, 'JSONL questions.', required=True)
  flags.DEFINE_string('out', None, 'JSONL answers.', required=True)
  flags.DEFINE_integer('batch_size', 64, 'Questions per pass.',
                       lower_bound=1)


def read_questions(path: str, image_size: int):
  """(records, uint8 images [N, S, S, 3], question tokens [N, Q]).

  Raises:
    ValueError: naming the file and line of an unusable record.
  """
  tokenizer = tok.Tokenizer()
  base = os.path.dirname(os.path.abspath(path))
  records, images, questions = [], [], []
  with open(path) as f:
    lines = f.read().splitlines()
  for i, line in enumerate(lines):
    try:
      record = json.loads(line)
      image_path = os.path.join(base, record['image'])
      with Image.open(image_path) as image:
        pixels = np.asarray(image.convert('RGB'))
      if pixels.shape[:2] != (image_size, image_size):
        raise ValueError(f'{record["image"]} is {pixels.shape[1]}x'
                         f'{pixels.shape[0]}, the model takes '
                         f'{image_size}x{image_size}')
      questions.append(tokenizer.encode_padded(
          record['question'], questions_lib.QUESTION_LEN, left=True))
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ValueError(f'{path}:{i + 1}: {e}') from None
    records.append(record)
    images.append(pixels)
  if not records:
    raise ValueError(f'{path}: no questions')
  return records, np.stack(images), np.asarray(questions, np.int32)


def answer(model, images, questions, batch_size: int) -> list[str]:
  """Greedy replies (a rationale, if any, then one word), in order."""
  tokenizer = tok.Tokenizer()
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, pixels, questions):
    return sampling.greedy_answers(nnx.merge(graphdef, state), pixels,
                                   questions, questions_lib.ANSWER_TOKENS)

  out = []
  for start in range(0, len(images), batch_size):
    pixels = images[start:start + batch_size]
    qs = questions[start:start + batch_size]
    pad = batch_size - len(pixels)  # One compiled shape.
    tokens = run(state, vae_lib.from_uint8(
        np.concatenate([pixels, np.repeat(pixels[:1], pad, 0)])),
                 np.concatenate([qs, np.repeat(qs[:1], pad, 0)]))
    out.extend(tokenizer.decode(t) for t in np.asarray(tokens)[:len(qs)])
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  try:
    config = trained.read_config(args.checkpoint)
    records, images, questions = read_questions(args.questions,
                                                config.world.image_size)
    _, model, _ = trained.load(args.checkpoint)
  except (OSError, ValueError) as e:
    sys.stderr.write(f'answer: {e}\n')
    sys.exit(1)
  answers = answer(model, images, questions, args.batch_size)
  with open(args.out, 'w') as f:
    for record, text in zip(records, answers):
      word = questions_lib.answer_word(text)
      rationale = text[:len(text) - len(word)].strip()
      f.write(json.dumps({**record, 'answer': word,
                          **({'rationale': rationale} if rationale else {})})
              + '\n')
  print(f'wrote {len(answers)} answers to {args.out}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
