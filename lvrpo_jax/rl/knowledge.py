"""r_kn's questions (DESIGN §6): derived from a prompt's spec in the world's
own question templates, tokenized as the judge is asked them, and scored
against the answers the spec allows.

The judge (the frozen reference model's understanding path) answers them
in `rewards.r_kn`; this module holds what needs no model.
"""

import dataclasses
from typing import Sequence

import numpy as np

from lvrpo_jax.world import questions as questions_lib
from lvrpo_jax.world import spec as spec_lib
from lvrpo_jax.world import tokenizer as tok

# The judge is asked as the eval stage asks (train/evaluate.py): in
# questions_lib's QUESTION_LEN and ANSWER_TOKENS, scored on the last word.
_TOKENIZER = tok.Tokenizer()


@dataclasses.dataclass(frozen=True)
class KnQuestion:
  """A question derived from a spec; `answers` are all accepted."""
  text: str
  answers: tuple[str, ...]


def _article(word: str) -> str:
  return 'an' if word[0] in 'aeiou' else 'a'


def _describe(req: spec_lib.Requirement) -> str:
  return ' '.join(w for w in (req.color, req.shape) if w)


def _named_once(reqs, key) -> dict:
  """{value: requirement} for the values of `key` that the requirements
  name exactly once (one requirement, count 1)."""
  counts = {}
  for r in reqs:
    if key(r) is not None:
      counts[key(r)] = counts.get(key(r), 0) + r.count
  return {key(r): r for r in reqs if counts.get(key(r)) == 1}


def questions(spec: spec_lib.Spec) -> tuple[KnQuestion, ...]:
  """The questions r_kn asks about an image generated for `spec`.

  Worded with the world's question templates (world/questions.py), so the
  judge was trained on them: how many <shape>s (the counts the spec's
  uncoloured requirements allow: exactly n for counting, at least one
  otherwise); is there a <colour> <shape> (yes); what colour is the <shape>
  and what shape is the <colour> object, for a shape or colour the spec names
  once; is the <shape> <relation> the <shape> (yes). The world's relation
  questions name colours; a `position` spec has none, so its relation
  question is the same template without them.
  """
  inc, exc = spec.include, spec.exclude
  out = []
  for shape in dict.fromkeys(r.shape for r in inc + exc if r.color is None):
    lo = max([r.count for r in inc if r.color is None and r.shape == shape],
             default=0)
    hi = min([r.count for r in exc if r.color is None and r.shape == shape],
             default=len(spec_lib.NUMBERS))
    out.append(KnQuestion(f'how many {spec_lib.plural(shape)} are there ?',
                          spec_lib.NUMBERS[lo:hi]))
  for r, answer in [(r, 'yes') for r in inc] + [
      (r, 'no') for r in exc if r.count == 1]:
    if r.color is not None:
      out.append(KnQuestion(
          f'is there {_article(r.color)} {r.color} {r.shape} ?', (answer,)))
  for shape, r in _named_once(inc, lambda r: r.shape).items():
    if r.color is not None:
      out.append(KnQuestion(f'what color is the {shape} ?', (r.color,)))
  for color, r in _named_once(inc, lambda r: r.color).items():
    out.append(KnQuestion(f'what shape is the {color} object ?', (r.shape,)))
  for r in inc:
    target = inc[r.target] if r.relation is not None else None
    if target is not None and r.count == target.count == 1:
      out.append(KnQuestion(f'is the {_describe(r)} {r.relation} the '
                            f'{_describe(target)} ?', ('yes',)))
  unique = {}
  for q in out:  # The first of equal questions (e.g. a repeated pair).
    unique.setdefault(q.text, q)
  return tuple(unique.values())


def question_rows(questions_nq) -> tuple[np.ndarray, np.ndarray]:
  """Every sample's questions as rows, in order: (the sample each row asks
  about [R], its question ids [R, QUESTION_LEN], left-padded). One row per
  (sample, question), so the judge answers no padding (a prompt derives 1
  to 6 questions, about 3 on average)."""
  length = questions_lib.QUESTION_LEN
  samples, ids = [], []
  for i, qs in enumerate(questions_nq):
    for q in qs:
      samples.append(i)
      ids.append(_TOKENIZER.encode_padded(q.text, length, left=True))
  return (np.asarray(samples, np.int32),
          np.asarray(ids, np.int32).reshape(len(ids), length))


def scores(specs, answers: Sequence[Sequence[str]]) -> np.ndarray:
  """The fraction [N] of each sample's `questions` whose answer (in
  `answers[n]`, in order) is accepted.

  Raises:
    ValueError: for a spec that derives no question (every spec the
      world's grammar parses derives one: a count or an 'is there').
  """
  out = []
  for s, got in zip(specs, answers, strict=True):
    qs = questions(s)
    if not qs:
      raise ValueError(f'{s} derives no r_kn question')
    out.append(np.mean([a in q.answers for a, q in zip(got, qs,
                                                       strict=True)]))
  return np.array(out, np.float32)
