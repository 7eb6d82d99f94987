"""Tests of world examples and their splits (world/examples.py, scene.py).

The held-out compositions are written out by hand here, converses included,
and every fact an image shows is recomputed from its object boxes, so the
split guarantees are checked without the library's own bookkeeping
(`Compositions.shows`, `Question.pairs`, `Spec.pairs`).
"""

import collections
import itertools
import re

import numpy as np
import pytest

from lvrpo_jax.world import examples
from lvrpo_jax.world import objects
from lvrpo_jax.world import questions as questions_lib
from lvrpo_jax.world import scene as scene_lib
from lvrpo_jax.world import spec as spec_lib
from lvrpo_jax.world.detector import detect
from lvrpo_jax.world.verify import relative_position

_HELD_PAIRS = {('purple', 'circle'), ('orange', 'square'),
               ('cyan', 'triangle')}
# 'triangle above circle' and 'circle left_of square', with their converses.
_HELD_FACTS = {('triangle', 'above', 'circle'),
               ('circle', 'below', 'triangle'),
               ('circle', 'left of', 'square'),
               ('square', 'right of', 'circle')}
_COMPOSITIONS = examples.Compositions.parse(
    ('purple circle', 'orange square', 'cyan triangle'),
    ('triangle above circle', 'circle left_of square'))
_WORLD = examples.WorldSpec(heldout=_COMPOSITIONS)
_SIZES = {'train': 1500, 'test': 300, 'heldout': 300, 'val': 300}

_RELATION = '|'.join(spec_lib.RELATIONS)
_QUESTION_PATTERNS = {
    'count_shape': re.compile(r'how many (\w+)s are there \?'),
    'count_color': re.compile(r'how many (\w+) objects are there \?'),
    'color': re.compile(r'what color is the (\w+) \?'),
    'shape': re.compile(r'what shape is the (\w+) object \?'),
    'exists': re.compile(r'is there an? (\w+) (\w+) \?'),
    'relation': re.compile(
        rf'is the (\w+) (\w+) ({_RELATION}) the (\w+) (\w+) \?'),
}


@pytest.fixture(scope='module')
def split_examples():
  return {split: [examples.make_example(_WORLD, split, i) for i in range(n)]
          for split, n in _SIZES.items()}


def _parse_question(question):
  """(pattern name, groups) of the one pattern the question text matches."""
  matches = [(name, m.groups()) for name, pattern in _QUESTION_PATTERNS.items()
             if (m := pattern.fullmatch(question.text))]
  assert len(matches) == 1, question.text
  (name, groups), = matches
  assert name.split('_')[0] == question.family, question
  return name, groups


def _question_names(question):
  """(colour, shape) pairs and relation facts a question and its answer
  reveal, read off the text alone."""
  name, groups = _parse_question(question)
  if name == 'color':
    return {(question.answer, groups[0])}, set()
  if name == 'shape':
    return {(groups[0], question.answer)}, set()
  if name == 'exists':
    return {groups}, set()
  if name == 'relation':
    c1, s1, relation, c2, s2 = groups
    return {(c1, s1), (c2, s2)}, {(s1, relation, s2)}
  return set(), set()


def _spec_names(spec):
  """(colour, shape) pairs and relation facts a spec names."""
  pairs = {(r.color, r.shape) for r in spec.include if r.color is not None}
  facts = {(r.shape, r.relation, spec.include[r.target].shape)
           for r in spec.include if r.relation is not None}
  return pairs, facts


def _image_facts(scene):
  """(shape, relation, shape) facts between every ordered pair of objects."""
  side = 7 * scene.image_size // 32
  box = lambda o: (o.x0, o.y0, o.x0 + side, o.y0 + side)
  return {(a.shape, r, b.shape)
          for a, b in itertools.permutations(scene.objects, 2)
          for r in relative_position(box(a), box(b))}


def test_compositions_parse():
  assert _COMPOSITIONS.pairs == _HELD_PAIRS
  assert _COMPOSITIONS.relations == _HELD_FACTS
  assert len(_COMPOSITIONS.allowed_pairs()) == 8 * 3 - 3


def test_determinism():
  for split in examples.SPLITS:
    for i in (0, 7, 123):
      a = examples.make_example(_WORLD, split, i)
      b = examples.make_example(_WORLD, split, i)
      assert a == b
      assert a.split == split and a.index == i
      assert (scene_lib.render(a.scene).tobytes()
              == scene_lib.render(b.scene).tobytes())


def test_different_indices_and_seeds_differ(split_examples):
  for split in examples.SPLITS:
    keys = [ex.key() for ex in split_examples[split][:100]]
    assert len(set(keys)) >= 95, split
  other = examples.WorldSpec(seed=1, heldout=_COMPOSITIONS)
  same = sum(examples.make_example(other, 'train', i) == ex
             for i, ex in enumerate(split_examples['train'][:100]))
  assert same <= 5


def test_splits_are_disjoint(split_examples):
  # No image is in two splits (so no example is either), but for val, a
  # second draw from test's distribution.
  images = {split: {scene_lib.render(ex.scene).tobytes() for ex in exs}
            for split, exs in split_examples.items()}
  for a, b in itertools.combinations(examples.SPLITS, 2):
    if {a, b} != {'test', 'val'}:
      assert not images[a] & images[b], (a, b)
  for split in ('test', 'val'):
    assert all(examples.content_bucket(ex.scene_key()) == 0
               for ex in split_examples[split])
  assert all(examples.content_bucket(ex.scene_key()) != 0
             for ex in split_examples['train'])


def test_val_is_another_draw_of_the_test_distribution(split_examples):
  test, val = split_examples['test'], split_examples['val']
  # Its own stream: example i differs from test's example i ...
  assert sum(a.key() == b.key() for a, b in zip(test, val)) <= 3
  # ... and images recur between the two about as often as within test
  # (the draws are independent): the first half of test against the second
  # is the yardstick.
  render = lambda exs: {scene_lib.render(ex.scene).tobytes() for ex in exs}
  half = len(test) // 2
  within = len(render(test[:half]) & render(test[half:]))
  across = len(render(test[:half]) & render(val[half:]))
  assert abs(across - within) <= max(5, within // 2), (across, within)
  # The same mix of tags: 300 draws of six uniform tags each (binomial sd
  # ~6.5 for a tag's count of 50).
  for exs in (test, val):
    counts = collections.Counter(ex.tag for ex in exs)
    assert set(counts) == set(spec_lib.TAGS)
    assert all(abs(n - 50) <= 25 for n in counts.values()), counts


def test_train_buckets_are_uniform(split_examples):
  # Test is an unbiased sample only if buckets are: 1500 train keys over
  # buckets 1..15 expect 100 each (binomial sd ~ 9.7).
  counts = collections.Counter(examples.content_bucket(ex.scene_key())
                               for ex in split_examples['train'])
  assert set(counts) == set(range(1, examples.TEST_BUCKETS))
  assert all(60 <= c <= 140 for c in counts.values()), counts


@pytest.mark.parametrize('split', ['train', 'test'])
def test_train_and_test_never_show_held_out(split_examples, split):
  for ex in split_examples[split]:
    shown = {(o.color, o.shape) for o in ex.scene.objects}
    assert not shown & _HELD_PAIRS, ex
    assert not _image_facts(ex.scene) & _HELD_FACTS, ex
    spec = spec_lib.parse_prompt(ex.prompt)
    assert spec == ex.spec, ex.prompt
    pairs, facts = _spec_names(spec)
    assert not pairs & _HELD_PAIRS and not facts & _HELD_FACTS, ex.prompt
    pairs, facts = _question_names(ex.question)
    assert not pairs & _HELD_PAIRS and not facts & _HELD_FACTS, ex.question


def test_heldout_examples_use_a_held_out_composition(split_examples):
  tags = collections.Counter()
  for ex in split_examples['heldout']:
    spec = spec_lib.parse_prompt(ex.prompt)
    assert spec == ex.spec, ex.prompt
    pairs, facts = _spec_names(spec)
    assert pairs & _HELD_PAIRS or facts & _HELD_FACTS, ex.prompt
    tags[ex.tag] += 1
  assert set(tags) == set(examples.HELDOUT_TAGS)


def test_every_tag_and_family_occurs(split_examples):
  for split in ('train', 'test'):
    exs = split_examples[split]
    assert {ex.tag for ex in exs} == set(spec_lib.TAGS), split
    assert {ex.question.family for ex in exs} == set(
        questions_lib.FAMILIES), split
  assert {ex.question.family for ex in split_examples['heldout']} == set(
      questions_lib.FAMILIES)


def _detector_answer(question, dets):
  """The answer to `question` recomputed from detections alone."""
  name, groups = _parse_question(question)
  if name == 'count_shape':
    return spec_lib.NUMBERS[sum(d.shape == groups[0] for d in dets)]
  if name == 'count_color':
    return spec_lib.NUMBERS[sum(d.color == groups[0] for d in dets)]
  if name == 'color':
    (det,) = [d for d in dets if d.shape == groups[0]]
    return det.color
  if name == 'shape':
    (det,) = [d for d in dets if d.color == groups[0]]
    return det.shape
  if name == 'exists':
    return 'yes' if any((d.color, d.shape) == groups for d in dets) else 'no'
  c1, s1, relation, c2, s2 = groups
  (a,) = [d for d in dets if (d.color, d.shape) == (c1, s1)]
  (b,) = [d for d in dets if (d.color, d.shape) == (c2, s2)]
  return 'yes' if relation in relative_position(a.bbox, b.bbox) else 'no'


def _detector_rationale(question, dets):
  """A relation's rationale from detections: the grid cell (row, column)
  of each named object's colour centroid; '' for other families."""
  name, groups = _parse_question(question)
  if name != 'relation':
    return ''
  c1, s1, _, c2, s2 = groups
  cell = 32 // objects.GRID_CELLS
  words = []
  for color, shape in ((c1, s1), (c2, s2)):
    (det,) = [d for d in dets if (d.color, d.shape) == (color, shape)]
    x, y = det.centroid
    words += [spec_lib.NUMBERS[int(y // cell)],
              spec_lib.NUMBERS[int(x // cell)]]
  return ' '.join(words)


def test_answers_agree_with_the_detector(split_examples):
  rng = np.random.default_rng(0)
  checked = collections.Counter()
  exs = (split_examples['train'][:100] + split_examples['test'][:50]
         + split_examples['heldout'][:50])
  for ex in exs:
    dets = detect(scene_lib.render(ex.scene))
    assert len(dets) == len(ex.scene.objects)
    asked = [ex.question] + [questions_lib.ask(rng, ex.scene, f)
                             for f in questions_lib.FAMILIES]
    for q in asked:
      if q is None:
        continue
      assert q.answer == _detector_answer(q, dets), (ex.scene, q)
      assert q.rationale == _detector_rationale(q, dets), (ex.scene, q)
      checked[q.family, q.answer] += 1
  # Both yes and no answers, and each family many times.
  for family in ('exists', 'relation'):
    assert checked[family, 'yes'] >= 20 and checked[family, 'no'] >= 20
  for family in questions_lib.FAMILIES:
    assert sum(n for (f, _), n in checked.items() if f == family) >= 100


def test_scene_objects_fit_and_keep_apart():
  for layout in objects.LAYOUTS:
    world = examples.WorldSpec(layout=layout, heldout=_COMPOSITIONS)
    for i in range(100):
      scene = examples.make_example(world, 'train', i).scene
      s = scene.object_size
      assert s == 7
      for o in scene.objects:
        assert 0 <= o.x0 <= 32 - s and 0 <= o.y0 <= 32 - s
      for a, b in itertools.combinations(scene.objects, 2):
        # Grid cells are 8 px, free layout keeps a 2 px gap: either way
        # boxes are at least s + 1 apart along one axis.
        apart = s + (1 if layout == 'grid' else objects.FREE_LAYOUT_GAP)
        assert abs(a.x0 - b.x0) >= apart or abs(a.y0 - b.y0) >= apart
        if layout == 'grid':
          assert a.x0 % 8 == 0 and a.y0 % 8 == 0


def test_one_object_worlds_only_have_one_object_tags():
  world = examples.WorldSpec(max_objects=1, heldout=_COMPOSITIONS)
  tags = set()
  for i in range(100):
    ex = examples.make_example(world, 'train', i)
    assert len(ex.scene.objects) == 1
    tags.add(ex.tag)
  assert tags == {'single_object', 'colors'}
  assert {examples.make_example(world, 'heldout', i).tag
          for i in range(20)} == {'colors'}


@pytest.mark.parametrize('pairs, relations, tags', [
    ((), ('triangle above circle',), {'position'}),
    (('red circle',), (), {'colors', 'color_attr'}),
])
def test_heldout_tags_follow_the_held_out_kinds(pairs, relations, tags):
  # Held-out pairs can only be asked for by colour prompts, relations only
  # by position prompts.
  world = examples.WorldSpec(
      heldout=examples.Compositions.parse(pairs, relations))
  assert {examples.make_example(world, 'heldout', i).tag
          for i in range(40)} == tags


def test_max_objects_bounds_scenes_and_counts():
  world = examples.WorldSpec(max_objects=2, heldout=_COMPOSITIONS)
  for i in range(100):
    ex = examples.make_example(world, 'train', i)
    assert len(ex.scene.objects) <= 2
    if ex.tag == 'counting':
      assert ex.spec.include[0].count == 2


@pytest.mark.parametrize('pairs, relations, named', [
    (('pink circle',), (), "'pink'"),
    (('purple star',), (), "'star'"),
    (('purple',), (), "'purple'"),
    ((), ('triangle near circle',), "'triangle near circle'"),
    ((), ('triangle left of circle',), "'triangle left of circle'"),
    ((), ('circle above circle',), "'circle above circle'"),
    ((), ('star above circle',), "'star'"),
])
def test_compositions_parse_errors(pairs, relations, named):
  with pytest.raises(ValueError, match=named):
    examples.Compositions.parse(pairs, relations)


@pytest.mark.parametrize('kwargs, named', [
    ({'image_size': 48}, 'image_size=48'),
    ({'layout': 'hex'}, "'hex'"),
    ({'max_objects': 0}, 'max_objects=0'),
    ({'max_objects': 5}, 'max_objects=5'),
    ({'train_relation_first': 1.5}, 'train_relation_first=1.5'),
])
def test_world_spec_rejects_bad_values(kwargs, named):
  with pytest.raises(ValueError, match=named):
    examples.WorldSpec(**kwargs)


def test_make_example_bad_split():
  with pytest.raises(ValueError, match="'dev'"):
    examples.make_example(_WORLD, 'dev', 0)
  with pytest.raises(ValueError, match='heldout split needs'):
    examples.make_example(examples.WorldSpec(), 'heldout', 0)


def test_make_scene_bad_input():
  with pytest.raises(ValueError, match="'pink'"):
    scene_lib.make_scene(32, 'grid', [('pink', 'circle')], [(0, 0)])
  with pytest.raises(ValueError, match="'star'"):
    scene_lib.make_scene(32, 'grid', [('red', 'star')], [(0, 0)])
  with pytest.raises(ValueError, match='image_size=48'):
    scene_lib.make_scene(48, 'grid', [('red', 'circle')], [(0, 0)])
  with pytest.raises(ValueError):
    scene_lib.make_scene(32, 'grid', [('red', 'circle')], [(0, 0), (8, 8)])


def test_make_scene_is_canonical():
  items = [('red', 'circle'), ('blue', 'square'), ('green', 'triangle')]
  origins = [(8, 16), (0, 24), (8, 0)]
  a = scene_lib.make_scene(32, 'grid', items, origins)
  b = scene_lib.make_scene(32, 'grid', items[::-1], origins[::-1])
  assert a == b and hash(a) == hash(b)
  # Reading order: top row first, then left to right.
  assert [(o.y0, o.x0) for o in a.objects] == [(0, 24), (8, 0), (8, 16)]


@pytest.mark.parametrize('n', [0, 5])
def test_sample_origins_bad_count(n):
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match=f'n={n}'):
    scene_lib.sample_origins(rng, 32, 'grid', n)


def test_sample_origins_bad_layout():
  with pytest.raises(ValueError, match="'hex'"):
    scene_lib.sample_origins(np.random.default_rng(0), 32, 'hex', 2)


def test_train_relation_first_changes_the_train_questions_only():
  world = examples.WorldSpec(heldout=_COMPOSITIONS, train_relation_first=0.5)
  for split in ('test', 'heldout'):
    for i in range(100):
      assert (examples.make_example(world, split, i)
              == examples.make_example(_WORLD, split, i)), (split, i)
  share = lambda w: np.mean([
      examples.make_example(w, 'train', i).question.family == 'relation'
      for i in range(600)])
  # About one scene in two can be asked a relation (two objects unique in
  # colour and shape, naming no held-out fact): about half of those are
  # asked one first, and a fifth of the rest by the random order.
  plain, boosted = share(_WORLD), share(world)
  assert 0.06 < plain < 0.2 and boosted > plain + 0.15, (plain, boosted)


def test_relation_rationale_by_hand():
  # Red circle in grid cell 4 (row 1, column 0), blue square in cell 6
  # (row 1, column 2): 'left of' / 'right of' either way round.
  scene = scene_lib.make_scene(
      32, 'grid', [('red', 'circle'), ('blue', 'square')],
      [scene_lib.grid_origin(32, 4), scene_lib.grid_origin(32, 6)])
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(40):
    q = questions_lib.ask(rng, scene, 'relation')
    first = q.text.split()[2:4]
    want = 'one zero one two' if first == ['red', 'circle'] else (
        'one two one zero')
    assert q.rationale == want, q
    assert q.reply(True) == f'{want} {q.answer}'
    assert q.reply(False) == q.answer
    assert questions_lib.answer_word(q.reply(True)) == q.answer
    seen.add((q.text, q.answer))
  assert len(seen) >= 4  # Both orders, true and false relations.
  # Other families have none.
  q = questions_lib.ask(rng, scene, 'count')
  assert q.rationale == '' and q.reply(True) == q.answer
  assert questions_lib.answer_word('') == ''
  # The free layout: the cell of the object's centre, not of its corner.
  obj = scene_lib.SceneObject(y0=6, x0=13, color='red', shape='circle')
  assert questions_lib.cell_words(obj, 32) == 'one two'
