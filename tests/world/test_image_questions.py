"""Questions about generated images: answered from what is drawn, novel
compositions first, each image detected once per step."""

import numpy as np

from lvrpo_jax.rl import rewards as rewards_lib
from lvrpo_jax.world import detector
from lvrpo_jax.world import examples
from lvrpo_jax.world import scene as scene_lib
from lvrpo_jax.world import spec as spec_lib
from lvrpo_jax.world.image_questions import generated_questions
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
