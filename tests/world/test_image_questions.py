"""Questions about generated images: answered from what is drawn, novel
compositions first, each image detected once per step."""

import numpy as np

from lvrpo_jax.rl import rewards as rewards_lib
from lvrpo_jax.world import detector
from lvrpo_jax.world import examples
from lvrpo_jax.world import objects
from lvrpo_jax.world import scene as scene_lib
from lvrpo_jax.world import spec as spec_lib
from lvrpo_jax.world.image_questions import contrast_questions
from lvrpo_jax.world.image_questions import generated_questions
from lvrpo_jax.world.image_questions import pasted_novel_objects
from lvrpo_jax.world.verify import relative_position


def _true_answer(question, scene) -> str:
  """The answer to `question`, computed from the scene's objects."""
  present = {(o.color, o.shape) for o in scene.objects}
  if question.family == 'count':
    word = question.text.split()[2]  # 'how many <word> ...'
    n = sum(word in (o.color, spec_lib.plural(o.shape))
            for o in scene.objects)
    return spec_lib.NUMBERS[n]
  if question.family == 'color':
    (_, shape), = question.pairs
    return next(o.color for o in scene.objects if o.shape == shape)
  if question.family == 'shape':
    (color, _), = question.pairs
    return next(o.shape for o in scene.objects if o.color == color)
  if question.family == 'exists':
    return 'yes' if question.pairs <= present else 'no'
  # 'is the <colour> <shape> <relation> the <colour> <shape> ?'
  words = question.text.split()
  a, b = (next(o for o in scene.objects if (o.color, o.shape) == pair)
          for pair in ((words[2], words[3]), (words[-3], words[-2])))
  truth = relative_position(a.bbox(scene.object_size),
                           b.bbox(scene.object_size))
  return 'yes' if ' '.join(words[4:-4]) in truth else 'no'


def test_generated_questions_are_answered_from_what_is_drawn():
  world = examples.WorldSpec()
  scenes = [examples.make_example(world, 'train', i).scene
            for i in range(12)]
  noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  images = np.stack([scene_lib.render(s) for s in scenes] + [noise])
  asked = generated_questions(images, 8, (0, 5), 'grid')
  rows = [j for j, _ in asked]
  assert len(rows) == 8 and len(set(rows)) == 8 and 12 not in rows
  for j, question in asked:
    assert question.answer == _true_answer(question, scenes[j]), question
  # Every readable image is used before any is asked about twice.
  assert sorted(j for j, _ in generated_questions(
      images, 20, (0, 5), 'grid')) == list(range(12))
  assert generated_questions(images, 8, (0, 5), 'grid') == asked
  assert generated_questions(images, 8, (1, 5), 'grid') != asked
  assert generated_questions(images[12:], 8, (0, 5), 'grid') == []


def test_generated_questions_ask_about_novel_compositions_first():
  # Train scenes never show a held-out composition; held-out ones do.
  novel = examples.Compositions.parse(('purple circle', 'orange square'),
                                     ('triangle above circle',))
  world = examples.WorldSpec(heldout=novel)
  train = [examples.make_example(world, 'train', i).scene for i in range(8)]
  held = [examples.make_example(world, 'heldout', i).scene
          for i in range(40)]
  held = [s for s in held if novel.shows(s)][:3]
  assert len(held) == 3 and not any(novel.shows(s) for s in train)
  scenes = train[:4] + held[:1] + train[4:] + held[1:]
  images = np.stack([scene_lib.render(s) for s in scenes])
  asked = generated_questions(images, 5, (0, 5), 'grid', novel)
  rows = [j for j, _ in asked]
  # The three novel images come first, then others in the seed's order.
  assert sorted(rows[:3]) == [4, 9, 10], rows
  for j, question in asked:
    assert question.answer == _true_answer(question, scenes[j]), question
  # Where the scene allows, the question names the novel composition: a
  # novel pair can always be asked about ('exists', 'color' or 'shape'
  # unless repeated), a novel relation only by a relation question.
  for j, question in asked[:3]:
    pairs = {(o.color, o.shape) for o in scenes[j].objects}
    if pairs & novel.pairs:
      assert novel.names(question.pairs, question.relations), question
  # Without `novel` nothing is preferred: the same seed keeps its order.
  plain = generated_questions(images, 5, (0, 5), 'grid')
  assert [j for j, _ in plain] != rows


def test_questions_and_rewards_detect_each_generated_image_once(
    monkeypatch):
  world = examples.WorldSpec()
  batch = [examples.make_example(world, 'train', i) for i in range(6)]
  images = np.stack([scene_lib.render(e.scene) for e in batch])
  calls = []
  detect = detector.detect
  monkeypatch.setattr(detector, 'detect',
                      lambda image: calls.append(1) or detect(image))
  monkeypatch.setattr(detector, '_LAST_BATCH', {})
  assert len(generated_questions(images, 2, (0, 1), 'grid')) == 2
  scores, _ = rewards_lib.Scorer({'r_ins': 1.0}).score_generation(
      [e.spec for e in batch], [e.prompt for e in batch], images)
  np.testing.assert_array_equal(scores['r_ins'], 1.0)
  assert len(calls) == len(images)


def _novel_world(pairs=('purple circle', 'cyan triangle')):
  novel = examples.Compositions.parse(pairs, ())
  return novel, examples.WorldSpec(heldout=novel)


def _scenes(world, split, n, keep=lambda s: True):
  """The first `n` scenes of `split` that `keep` accepts."""
  out, i = [], 0
  while len(out) < n:
    scene = examples.make_example(world, split, i).scene
    if keep(scene):
      out.append(scene)
    i += 1
  return out


def test_pasted_novel_objects_put_each_novel_object_into_a_free_cell():
  novel, world = _novel_world()
  # Sources: two held-out scenes with exactly one novel object each, a
  # train scene (nothing to paste) and noise.
  one_novel = lambda s: sum((o.color, o.shape) in novel.pairs
                            for o in s.objects) == 1
  held = _scenes(world, 'heldout', 2, one_novel)
  wanted = [next(o for o in s.objects if (o.color, o.shape) in novel.pairs)
            for s in held]
  noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  train = _scenes(world, 'train', 6, lambda s: len(s.objects) < 4)
  full = _scenes(world, 'train', 1, lambda s: len(s.objects) == 4)
  sources = np.stack([scene_lib.render(held[0]),
                      scene_lib.render(train[0]), noise,
                      scene_lib.render(held[1])])
  hosts = [*train[1:4], full[0], *train[4:]]
  host_images = np.stack([scene_lib.render(s) for s in hosts])
  out = pasted_novel_objects(sources, host_images, 'grid', novel, 3)
  # A host that already holds MAX_OBJECTS gets nothing.
  assert [row for row, _, _ in out] == [0, 1, 2, 4, 5]
  s = objects.object_size(32)
  for k, (row, composite, scene) in enumerate(out):
    # The novel objects in turn, each added to its host's objects.
    obj = wanted[k % 2]
    added = set(scene.objects) - set(hosts[row].objects)
    assert set(hosts[row].objects) <= set(scene.objects)
    (new,), = [added]
    assert (new.color, new.shape) == (obj.color, obj.shape)
    # At a grid origin of a cell no host object is in; only its box changed.
    cell = (new.y0 // 8) * 4 + new.x0 // 8
    assert scene_lib.grid_origin(32, cell) == (new.y0, new.x0)
    assert all((o.y0 // 8, o.x0 // 8) != (new.y0 // 8, new.x0 // 8)
               for o in hosts[row].objects)
    changed = np.any(composite != host_images[row], axis=-1)
    assert changed[new.y0:new.y0 + s, new.x0:new.x0 + s].any()
    changed[new.y0:new.y0 + s, new.x0:new.x0 + s] = False
    assert not changed.any()
    np.testing.assert_array_equal(
        composite, scene_lib.render(scene_lib.Scene(
            32, 'grid', tuple(sorted(hosts[row].objects + (new,))))))
  # The seed picks the cells; nothing to paste, nothing out.
  again = pasted_novel_objects(sources, host_images, 'grid', novel, 3)
  assert all(np.array_equal(a[1], b[1]) for a, b in zip(out, again))
  other = pasted_novel_objects(sources, host_images, 'grid', novel, 4)
  assert any(not np.array_equal(a[1], b[1]) for a, b in zip(out, other))
  assert pasted_novel_objects(sources[1:3], host_images, 'grid', novel,
                              3) == []


def test_a_novel_object_cut_by_the_edge_is_not_pasted():
  novel, world = _novel_world()
  s = objects.object_size(32)
  # A cyan triangle whose top row lies above the image: it reads with its
  # box at y0 = -1, which has no whole crop (it once gave an empty one).
  cut = np.empty((32, 32, 3), np.uint8)
  cut[...] = objects.BACKGROUND
  cut[0:s - 1, 4:4 + s][objects.sprite('triangle', s)[1:]] = (
      objects.PALETTE['cyan'])
  found = detector.read_scene(cut, 'grid').objects
  assert [(o.color, o.shape, o.y0) for o in found] == [
      ('cyan', 'triangle', -1)]
  hosts = np.stack([scene_lib.render(h) for h in _scenes(
      world, 'train', 2, lambda h: len(h.objects) < 4)])
  assert pasted_novel_objects(cut[None], hosts, 'grid', novel, 0) == []


def test_pasted_objects_keep_the_free_layout_s_gap():
  novel, _ = _novel_world(('purple circle',))
  world = examples.WorldSpec(layout='free', heldout=novel)
  held = _scenes(world, 'heldout', 1,
                 lambda s: any((o.color, o.shape) in novel.pairs
                               for o in s.objects))
  hosts = _scenes(world, 'train', 8, lambda s: len(s.objects) < 4)
  out = pasted_novel_objects(scene_lib.render(held[0])[None],
                             np.stack([scene_lib.render(h) for h in hosts]),
                             'free', novel, 0)
  assert out
  s, gap = objects.object_size(32), objects.FREE_LAYOUT_GAP
  for row, _, scene in out:
    new, = set(scene.objects) - set(hosts[row].objects)
    for o in hosts[row].objects:
      apart = (abs(o.x0 - new.x0) >= s + gap or
               abs(o.y0 - new.y0) >= s + gap)
      assert apart, (o, new)


def test_pasted_composites_are_asked_about_their_novel_object():
  novel, world = _novel_world()
  held = _scenes(world, 'heldout', 2, novel.shows)
  hosts = _scenes(world, 'train', 4, lambda s: 1 < len(s.objects) < 4)
  out = pasted_novel_objects(
      np.stack([scene_lib.render(s) for s in held]),
      np.stack([scene_lib.render(h) for h in hosts]), 'grid', novel, 0)
  asked = generated_questions([c for _, c, _ in out], len(out), 0, 'grid',
                              novel, scenes=[sc for _, _, sc in out])
  assert len(asked) == len(out) == 4
  for k, question in asked:
    assert question.answer == _true_answer(question, out[k][2]), question
  # Each asked one question of each family, naming the novel object where
  # one of them does (this seed: three of the four).
  assert sum(novel.names(q.pairs, q.relations) for _, q in asked) == 3


def test_contrast_questions_ask_the_colour_of_an_ordinary_object():
  novel, _ = _novel_world(('cyan triangle',))
  obj = lambda cell, color, shape: scene_lib.SceneObject(
      *scene_lib.grid_origin(32, cell), color, shape)
  scenes = [
      # Two ordinary objects of unique shapes: either may be asked.
      scene_lib.Scene(32, 'grid', (obj(0, 'cyan', 'triangle'),
                                   obj(5, 'red', 'circle'),
                                   obj(9, 'cyan', 'square'))),
      # The novel object alone: nothing to ask.
      scene_lib.Scene(32, 'grid', (obj(3, 'cyan', 'triangle'),)),
      # The other shape repeated ('the circle' names no one object), and
      # the triangle is the novel one: nothing to ask.
      scene_lib.Scene(32, 'grid', (obj(1, 'cyan', 'triangle'),
                                   obj(6, 'red', 'circle'),
                                   obj(7, 'blue', 'circle'))),
      # A repeated triangle makes the square the only one to ask about.
      scene_lib.Scene(32, 'grid', (obj(1, 'cyan', 'triangle'),
                                   obj(2, 'white', 'triangle'),
                                   obj(8, 'green', 'square'))),
  ]
  asked = contrast_questions(scenes, novel, 0)
  assert [k for k, _ in asked] == [0, 3]
  assert asked[1][1].text == 'what color is the square ?'
  assert asked[1][1].answer == 'green'
  seen = {contrast_questions(scenes[:1], novel, seed)[0][1].answer
          for seed in range(20)}
  assert seen == {'red', 'cyan'}
  for k, question in asked:
    assert question.family == 'color'
    assert not novel.names(question.pairs, question.relations)
    assert question.answer == _true_answer(question, scenes[k])
