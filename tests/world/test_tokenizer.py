"""Tests of the world's word-level tokenizer (world/tokenizer.py)."""

import numpy as np
import pytest

from lvrpo_jax.world import examples
from lvrpo_jax.world import tokenizer as tokenizer_lib
from lvrpo_jax.world.tokenizer import (BOI, BOS, EOI, EOS, IMG, PAD, SPECIALS,
                                       Tokenizer)

_WORLD = examples.WorldSpec(heldout=examples.Compositions.parse(
    ('purple circle', 'orange square', 'cyan triangle'),
    ('triangle above circle', 'circle left_of square')))


@pytest.fixture(scope='module')
def tok():
  return Tokenizer()


def _world_texts() -> list[str]:
  """Every text of 100 examples per split: prompt, question, answer, caption."""
  texts = []
  for split in examples.SPLITS:
    for i in range(100):
      ex = examples.make_example(_WORLD, split, i)
      texts += [ex.prompt, ex.question.text, ex.question.answer, ex.caption]
  return texts


def test_special_ids(tok):
  # The documented layout: <pad> is 0 so zero-filled buffers are padding.
  assert (PAD, BOS, EOS, BOI, EOI, IMG) == (0, 1, 2, 3, 4, 5)
  assert SPECIALS == ('<pad>', '<bos>', '<eos>', '<boi>', '<eoi>', '<img>')
  assert tok.tokens[:6] == SPECIALS
  assert tok.ids['<pad>'] == 0 and tok.ids['<img>'] == 5


def test_vocabulary_is_unique_and_sorted(tok):
  words = tok.tokens[len(SPECIALS):]
  assert len(set(tok.tokens)) == len(tok.tokens) == tok.vocab_size
  assert list(words) == sorted(words)
  assert tokenizer_lib.vocabulary() == tok.tokens


def test_round_trip_on_world_texts(tok):
  texts = _world_texts()
  assert len(texts) == 100 * 4 * len(examples.SPLITS)
  for text in texts:
    ids = tok.encode(text)
    assert len(ids) == len(text.split())
    assert all(type(i) is int and len(SPECIALS) <= i < tok.vocab_size
               for i in ids), text
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, np.int32)) == text


def test_round_trip_every_word(tok):
  words = tok.tokens[len(SPECIALS):]
  for i, word in enumerate(words, start=len(SPECIALS)):
    assert tok.encode(word) == [i]
    assert tok.decode([i]) == word
  text = ' '.join(words)
  assert tok.decode(tok.encode(text)) == text


def test_encode_known_ids(tok):
  ids = tok.encode('a red circle')
  assert ids == [tok.ids['a'], tok.ids['red'], tok.ids['circle']]
  assert tok.encode('a red circle', bos=True) == [BOS] + ids
  assert tok.encode('a red circle', eos=True) == ids + [EOS]
  assert tok.encode('a red circle', bos=True, eos=True) == [BOS] + ids + [EOS]
  assert tok.encode('', bos=True, eos=True) == [BOS, EOS]


def test_decode_stops_at_eos_and_skips_specials(tok):
  a, red, circle = tok.encode('a red circle')
  ids = [BOS, a, PAD, red, IMG, EOS, circle]
  assert tok.decode(ids) == 'a red'
  assert tok.decode(ids, skip_special=False) == '<bos> a <pad> red <img>'
  assert tok.decode([EOS, a]) == ''
  # A [1, T] array of ids decodes like the flat list.
  assert tok.decode(np.array([[BOI, a, circle, EOI]])) == 'a circle'


@pytest.mark.parametrize('text, unknown', [
    ('a photo of a star', ['star']),
    ('a hexagon and a star', ['hexagon', 'star']),
    ('A red circle', ['A']),
    ('is there a red circle?', ['circle?']),
])
def test_oov_words_are_named(tok, text, unknown):
  with pytest.raises(ValueError) as info:
    tok.encode(text)
  for word in unknown:
    assert repr(word) in str(info.value)


@pytest.mark.parametrize('special', SPECIALS)
def test_specials_written_as_text_are_rejected(tok, special):
  with pytest.raises(ValueError, match=special):
    tok.encode(f'a {special} circle')


def test_encode_padded(tok):
  a, red, circle = tok.encode('a red circle')
  out = tok.encode_padded('a red circle', 7, bos=True, eos=True)
  assert out.dtype == np.int32 and out.shape == (7,)
  np.testing.assert_array_equal(out, [BOS, a, red, circle, EOS, PAD, PAD])
  exact = tok.encode_padded('a red circle', 3)
  np.testing.assert_array_equal(exact, [a, red, circle])
  with pytest.raises(ValueError, match='4 tokens exceed length 3'):
    tok.encode_padded('a red circle', 3, eos=True)
  assert tok.decode(out) == 'a red circle'
  left = tok.encode_padded('a red circle', 5, left=True)
  np.testing.assert_array_equal(left, [PAD, PAD, a, red, circle])
  np.testing.assert_array_equal(tok.encode_padded('a red circle', 3,
                                                  left=True), exact)
  with pytest.raises(ValueError, match="4 tokens exceed length 3: 'a red"):
    tok.encode_padded('a red circle', 3, eos=True, left=True)


@pytest.mark.parametrize('bad', [-1, 'size'])
def test_decode_rejects_ids_outside_the_vocabulary(tok, bad):
  i = tok.vocab_size if bad == 'size' else bad
  with pytest.raises(ValueError, match=f'token id {i} outside'):
    tok.decode([tok.ids['a'], i])
