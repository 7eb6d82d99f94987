"""The `lvrpo` stage's prompt sources: answer and generation prompts from
the world's records, the train/held-out mix of generation prompts, and the
prompt ids that key each sample's randomness."""

import grain
import numpy as np

from lvrpo_jax import configs
from lvrpo_jax.train import pretrain
from lvrpo_jax.world import questions
from lvrpo_jax.world import spec as spec_lib
from lvrpo_jax.world import tokenizer as tok


# Held-out prompts' ids: their index in the held-out split plus this, so no
# id is also a train example's. A prompt's id keys its samples' randomness
# (`sample_keys`), so results do not depend on where a prompt lands in the
# batch, nor on the device or process count.
HELDOUT_IDS = 1 << 30
# Understanding prompts about the step's generated images: this plus the
# image's row in the step's generation samples.
GENERATED_IDS = 1 << 29
# A question's family in the prompts' 'family' field: its index in
# questions.FAMILIES, or this for a record that names none (the stage logs
# its rewards per family, `lvrpo_groups.label_means`).
NO_FAMILY = -1


def family_id(name: str | bytes | None) -> np.int32:
  """The 'family' field of a question of family `name` (None: NO_FAMILY)."""
  if name is None:
    return np.int32(NO_FAMILY)
  name = name.decode() if isinstance(name, bytes) else str(name)
  if name not in questions.FAMILIES:
    raise ValueError(f'unknown question family {name!r}; one of '
                     f'{questions.FAMILIES}')
  return np.int32(questions.FAMILIES.index(name))


class UnderstandingPrompts(grain.transforms.Map):
  """Record -> {'index', 'image', 'question' [Q] left-padded, 'answer'
  [A], 'family' (`family_id` of the record's 'family', if any)}."""

  def __init__(self):
    self.tokenizer = tok.Tokenizer()

  def map(self, record):
    encode = self.tokenizer.encode_padded
    return {'index': np.int32(record['index']), 'image': record['image'],
            'question': encode(record['question'], questions.QUESTION_LEN,
                               left=True),
            'answer': encode(record['answer'], questions.ANSWER_TOKENS,
                             eos=True),
            'family': family_id(record.get('family'))}


class GenerationPrompts(grain.transforms.Map):
  """Record -> {'index', 'prompt' [P] left-padded, 'tag' (the index in
  spec_lib.TAGS of the prompt's GenEval tag)} (the spec is the prompt's
  parse; the tag, parsed here once, is what the stage logs by)."""

  def __init__(self):
    self.tokenizer = tok.Tokenizer()

  def map(self, record):
    prompt = record['prompt']
    prompt = prompt.decode() if isinstance(prompt, bytes) else str(prompt)
    return {'index': np.int32(record['index']),
            'prompt': self.tokenizer.encode_padded(
                prompt, pretrain.PROMPT_LEN, left=True),
            'tag': np.int32(spec_lib.TAGS.index(
                spec_lib.parse_prompt(prompt).tag))}


def in_fraction(index: int, fraction: float) -> bool:
  """Whether `index` is among a low-discrepancy `fraction` of 0, 1, 2, ...
  (the golden-ratio sequence): any window of consecutive indices holds
  about that fraction, not just the whole range."""
  return (index * 0.6180339887498949) % 1.0 < fraction


class MixedPrompts:
  """Random access to train records with `fraction` of the indices taken
  from the held-out compositions instead (a low-discrepancy choice, so any
  window of indices holds about that fraction); a held-out record's
  'index' is offset by HELDOUT_IDS."""

  def __init__(self, train, heldout, fraction: float):
    if fraction > 0 and not len(heldout):
      raise ValueError('heldout_fraction > 0 but no held-out records')
    self.train, self.heldout, self.fraction = train, heldout, fraction

  def __len__(self):
    return len(self.train)

  def __getitem__(self, index):
    if in_fraction(index, self.fraction):
      record = self.heldout[index % len(self.heldout)]
      return {**record, 'index': record['index'] + HELDOUT_IDS}
    return self.train[index]


class Zipped:
  """Named iterators advanced together; checkpointable as one."""

  def __init__(self, **iterators):
    self.iterators = iterators

  def __next__(self):
    return {k: next(it) for k, it in self.iterators.items()}

  def get_state(self):
    return {k: it.get_state() for k, it in self.iterators.items()}

  def set_state(self, state):
    for k, it in self.iterators.items():
      it.set_state(state[k])


class TagFiltered:
  """Random access to the records of `source` whose GenEval 'tag' is one of
  `tags`, in the source's order. Finding them reads every record once (~9 s
  for the default 50,000 train records)."""

  def __init__(self, source, tags):
    wanted = {t.encode() if isinstance(t, str) else t for t in tags}
    self.source = source
    self.index = np.array([i for i in range(len(source))
                           if source[i]['tag'] in wanted], np.int64)

  def __len__(self):
    return len(self.index)

  def __getitem__(self, index):
    return self.source[int(self.index[index])]


def generation_source(train, heldout, tags, heldout_fraction: float):
  """The generation prompts: `MixedPrompts` of the train and held-out
  records, both kept to the GenEval `tags` when any are named
  (`lvrpo.gen_tags`)."""
  if tags:
    train, heldout = TagFiltered(train, tags), TagFiltered(heldout, tags)
    if not len(train) or (heldout_fraction and not len(heldout)):
      raise configs.ConfigError(
          'lvrpo.gen_tags', f'{tags} leave {len(train)} train and '
          f'{len(heldout)} held-out generation prompts (held-out ones are '
          f'needed with heldout_fraction {heldout_fraction})')
  return MixedPrompts(train, heldout, heldout_fraction)


class HeldoutTail:
  """The held-out records the eval stage does not score (those after its
  first `skip`), or all of them when there are no others."""

  def __init__(self, source, skip: int):
    self.source = source
    self.skip = skip if skip < len(source) else 0

  def __len__(self):
    return len(self.source) - self.skip

  def __getitem__(self, index):
    return self.source[self.skip + index]
