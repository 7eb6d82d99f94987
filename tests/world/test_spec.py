"""Tests of GenEval specs, their wording and parsing (world/spec.py)."""

import itertools
import json

import numpy as np
import pytest

from lvrpo_jax.world import objects
from lvrpo_jax.world import spec as spec_lib
from lvrpo_jax.world.spec import Requirement, Spec


def _all_specs() -> list[Spec]:
  """Every spec the constructors can build over the world's vocabulary."""
  shapes, colors = objects.SHAPES, objects.COLORS
  specs = [spec_lib.single_object(s) for s in shapes]
  specs += [spec_lib.two_object(a, b) for a, b in itertools.product(shapes,
                                                                     shapes)]
  specs += [spec_lib.counting(s, n) for s in shapes for n in (2, 3, 4)]
  specs += [spec_lib.colors(c, s) for c in colors for s in shapes]
  specs += [spec_lib.position(a, r, b) for a in shapes
            for r in spec_lib.RELATIONS for b in shapes]
  pairs = list(itertools.product(colors, shapes))
  specs += [spec_lib.color_attr(*p, *q) for p in pairs for q in pairs]
  return specs


_SPECS = _all_specs()


def test_spec_enumeration_is_complete():
  # 3 + 9 + 9 + 24 + 36 + 24 * 24: guards the round-trip test below against
  # silently covering fewer specs.
  assert len(_SPECS) == 3 + 9 + 9 + 24 + 36 + 576
  assert {s.tag for s in _SPECS} == set(spec_lib.TAGS)


def test_parse_inverts_prompt_for_every_spec_and_prefix():
  for spec in _SPECS:
    default = spec_lib.prompt(spec)
    assert default.startswith('a photo of ')
    body = default[len('a photo of '):]
    for prefix in spec_lib.PREFIXES:
      text = f'{prefix} {body}'.strip()
      assert spec_lib.parse_prompt(text) == spec, text


def test_prompt_rng_picks_every_prefix_and_parses_back():
  seen = set()
  for i, spec in enumerate(_SPECS):
    text = spec_lib.prompt(spec, np.random.default_rng(i))
    assert spec_lib.parse_prompt(text) == spec, text
    body = spec_lib.prompt(spec)[len('a photo of '):]
    # The rng only chooses the prefix; the rest of the wording is fixed.
    (prefix,) = [p for p in spec_lib.PREFIXES if f'{p} {body}'.strip() == text]
    seen.add(prefix)
  assert seen == set(spec_lib.PREFIXES)


@pytest.mark.parametrize('spec, text', [
    (spec_lib.single_object('triangle'), 'a photo of a triangle'),
    (spec_lib.two_object('circle', 'triangle'),
     'a photo of a circle and a triangle'),
    (spec_lib.counting('square', 3), 'a photo of three squares'),
    (spec_lib.counting('circle', 2), 'a photo of two circles'),
    (spec_lib.colors('orange', 'circle'), 'a photo of an orange circle'),
    (spec_lib.colors('red', 'square'), 'a photo of a red square'),
    (spec_lib.position('circle', 'left of', 'square'),
     'a photo of a circle left of a square'),
    (spec_lib.position('triangle', 'below', 'circle'),
     'a photo of a triangle below a circle'),
    (spec_lib.color_attr('red', 'circle', 'orange', 'square'),
     'a photo of a red circle and an orange square'),
])
def test_prompt_exact_wording(spec, text):
  assert spec_lib.prompt(spec) == text
  assert spec_lib.parse_prompt(text) == spec


def test_position_prompt_names_the_subject_first():
  # GenEval: 'a photo of a dog right of a cat' asks for the dog (the first
  # named object) right of the cat, the target, which is include[0].
  spec = spec_lib.parse_prompt('a photo of a circle left of a square')
  assert spec == Spec('position', (
      Requirement('square'),
      Requirement('circle', relation='left of', target=0)))
  assert spec.include[0].shape == 'square'
  assert spec.include[1].shape == 'circle'
  assert spec.include[1].relation == 'left of'
  assert spec.include[1].target == 0
  assert spec.relations() == {('circle', 'left of', 'square')}


def test_parse_normalizes_whitespace():
  spec = spec_lib.parse_prompt('  an image of   two\ttriangles ')
  assert spec == spec_lib.counting('triangle', 2)


@pytest.mark.parametrize('n', [2, 3, 4])
def test_counting_excludes_n_plus_one(n):
  spec = spec_lib.counting('triangle', n)
  assert spec.include == (Requirement('triangle', n),)
  assert spec.exclude == (Requirement('triangle', n + 1),)


def test_pairs_and_relations_of_a_spec():
  spec = spec_lib.color_attr('red', 'circle', 'blue', 'square')
  assert spec.pairs() == {('red', 'circle'), ('blue', 'square')}
  assert spec.relations() == set()
  spec = spec_lib.position('triangle', 'above', 'circle')
  assert spec.pairs() == set()
  assert spec.relations() == {('triangle', 'above', 'circle')}


def test_json_round_trip_for_every_spec():
  for spec in _SPECS:
    assert Spec.from_json(spec.to_json()) == spec


def test_json_layout():
  data = json.loads(spec_lib.counting('circle', 2).to_json())
  assert data == {
      'tag': 'counting',
      'include': [{'shape': 'circle', 'count': 2, 'color': None,
                   'relation': None, 'target': None}],
      'exclude': [{'shape': 'circle', 'count': 3, 'color': None,
                   'relation': None, 'target': None}],
  }


@pytest.mark.parametrize('make, value', [
    (lambda: Requirement('circle', color='pink'), 'pink'),
    (lambda: Requirement('star'), 'star'),
    (lambda: Requirement('circle', relation='near', target=0), 'near'),
    (lambda: Spec('objects', (Requirement('circle'),)), 'objects'),
])
def test_bad_values_raise_naming_the_value(make, value):
  with pytest.raises(ValueError, match=f"'{value}'"):
    make()


@pytest.mark.parametrize('count', [0, 6])
def test_requirement_count_out_of_range(count):
  with pytest.raises(ValueError, match=f'count={count}'):
    Requirement('circle', count)


def test_relation_and_target_go_together():
  with pytest.raises(ValueError, match='together'):
    Requirement('circle', relation='above')
  with pytest.raises(ValueError, match='together'):
    Requirement('circle', target=0)


@pytest.mark.parametrize('target', [0, 1, -1])
def test_target_must_name_an_earlier_requirement(target):
  # include[1] may only refer to include[0].
  include = (Requirement('square'),
             Requirement('circle', relation='above', target=target))
  if target == 0:
    Spec('position', include)
  else:
    with pytest.raises(ValueError, match=f'target={target}'):
      Spec('position', include)


@pytest.mark.parametrize('text, named', [
    ('a photo of a star', 'star'),
    ('a photo of a pink circle', 'pink'),
    ('a photo of two red circles', 'two red circles'),
    ('hello', 'hello'),
    ('a photo of one circle', 'one'),
    ('a photo of two circle', 'circle'),
    ('a photo of a circles', 'circles'),
    ('a photo of a red circle and a square', 'a red circle and a square'),
    ('a photo of two circles and a square', 'two circles and a square'),
    ('a photo of a circle and a square and a triangle',
     'a circle and a square and a triangle'),
    ('a photo of a red circle left of a square', 'red circle left of'),
    ('a photo of a circle left of two squares', 'two squares'),
    ('a photo of', 'names no object'),
    ('', 'names no object'),
])
def test_prompts_outside_the_grammar_raise(text, named):
  with pytest.raises(ValueError, match=named):
    spec_lib.parse_prompt(text)
