"""Questions about images the world did not draw (e.g. a policy's own
generated ones), answered by what the world's detector reads in them."""

import numpy as np

from lvrpo_jax.world import detector
from lvrpo_jax.world import questions as questions_lib


def generated_questions(images, count: int, seed, layout: str,
                        novel=None):
  """Up to `count` (row, question) pairs about distinct images, each a
  question of a family drawn uniformly (another where the scene has none of
  it, e.g. a relation needs two objects) about what the world's detector
  reads in the image; images it cannot read as a scene
  (`detector.read_scene`) are passed over.
  The answers are exact for the image as drawn, whatever its prompt asked
  for, so the policy learns to read its own images: held-out compositions
  included, which no dataset image shows.

  Args:
    images: uint8 [N, S, S, 3].
    count: questions wanted.
    seed: numpy seed of the choice of images, families and questions.
    layout: the world's layout.
    novel: `examples.Compositions` or None. Given, the images that show one
      of them come first, each asked a question naming one where its scene
      allows: the answer prompts of the dataset never show these
      compositions, only the policy's own images can.
  """
  rng = np.random.default_rng(seed)
  order = [int(j) for j in rng.permutation(len(images))]
  images = np.asarray(images)
  # Every image (the step's rewards then reuse these detections).
  scenes = [detector.read_scene(image, layout, found) for image, found in
            zip(images, detector.detect_batch(images))]
  novel_in = lambda scene: (novel is not None and scene is not None
                            and novel.shows(scene))
  # Stable: the seed's order within the novel images and the others.
  order.sort(key=lambda j: not novel_in(scenes[j]))
  asked = []
  for j in order:
    if len(asked) == count:
      break
    scene = scenes[j]
    if scene is None:
      continue
    candidates = [questions_lib.ask(rng, scene, str(family))
                  for family in rng.permutation(questions_lib.FAMILIES)]
    candidates = [q for q in candidates if q is not None]
    if novel_in(scene):
      candidates = [q for q in candidates
                    if novel.names(q.pairs, q.relations)] or candidates
    if candidates:
      asked.append((j, candidates[0]))
  return asked
