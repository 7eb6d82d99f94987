"""Word-level tokenizer over the shapes world's closed vocabulary.

Text is lower-case words separated by single spaces; punctuation (',', '?')
is written as separate words. Every word the world's grammar can produce is in
the vocabulary, so `decode(encode(text)) == text` for all of it, and any other
word is an error rather than an <unk>.

Special tokens:
  <pad>  padding (id 0)         <bos>  start of a sequence
  <eos>  end of text            <boi>  begin of image (generated latents)
  <eoi>  end of image           <img>  placeholder for an image token
                                       (ViT or latent) in token layouts
"""

import functools
from typing import Sequence

import numpy as np

from lvrpo_jax.world import objects
from lvrpo_jax.world.spec import NUMBERS, PREFIXES, RELATIONS, plural

SPECIALS: tuple[str, ...] = ('<pad>', '<bos>', '<eos>', '<boi>', '<eoi>',
                             '<img>')
PAD, BOS, EOS, BOI, EOI, IMG = range(len(SPECIALS))

_GRAMMAR_WORDS = (
    'a an and , ? how many are there what color shape is the object objects '
    'yes no')


@functools.cache
def vocabulary() -> tuple[str, ...]:
  """All tokens: the specials, then the world's words in sorted order."""
  words = set(_GRAMMAR_WORDS.split())
  words.update(objects.COLORS, objects.SHAPES, NUMBERS)
  words.update(plural(s) for s in objects.SHAPES)
  for phrase in PREFIXES + RELATIONS:
    words.update(phrase.split())
  return SPECIALS + tuple(sorted(words))


class Tokenizer:
  """Maps world text to int32 ids and back."""

  def __init__(self):
    self.tokens = vocabulary()
    self.ids = {t: i for i, t in enumerate(self.tokens)}

  @property
  def vocab_size(self) -> int:
    return len(self.tokens)

  def encode(self, text: str, *, bos: bool = False,
             eos: bool = False) -> list[int]:
    """Ids of the words of `text`.

    Raises:
      ValueError: naming every out-of-vocabulary word.
    """
    words = text.split()
    unknown = sorted({w for w in words if w not in self.ids or w in SPECIALS})
    if unknown:
      raise ValueError(f'out-of-vocabulary words {unknown} in {text!r}')
    ids = [self.ids[w] for w in words]
    return [BOS] * bos + ids + [EOS] * eos

  def decode(self, ids: Sequence[int] | np.ndarray, *,
             skip_special: bool = True) -> str:
    """Text of `ids`; stops at the first <eos>; drops specials by default."""
    words = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if not 0 <= i < len(self.tokens):
        raise ValueError(f'token id {i} outside the vocabulary '
                         f'[0, {len(self.tokens)})')
      if i == EOS:
        break
      if skip_special and i < len(SPECIALS):
        continue
      words.append(self.tokens[i])
    return ' '.join(words)

  def encode_padded(self, text: str, length: int, *, bos: bool = False,
                    eos: bool = False, left: bool = False) -> np.ndarray:
    """encode() padded with <pad> to int32 [length], on the right or, with
    `left`, on the left (prompts and questions: their last token is where
    generation starts); raises if too long."""
    ids = self.encode(text, bos=bos, eos=eos)
    if len(ids) > length:
      raise ValueError(f'{len(ids)} tokens exceed length {length}: {text!r}')
    out = np.full((length,), PAD, np.int32)
    start = length - len(ids) if left else 0
    out[start:start + len(ids)] = ids
    return out
