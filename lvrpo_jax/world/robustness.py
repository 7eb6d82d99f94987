"""Measuring the detector: image corruptions and object-level accuracy.

Used by the slow detector test and `benchmarks/world.py`, so both report the
same figures for the same seeds.
"""

import collections

import numpy as np
from scipy import ndimage

from lvrpo_jax.world import objects
from lvrpo_jax.world import scene as scene_lib
from lvrpo_jax.world.detector import detect


def blur_and_noise(image: np.ndarray, rng: np.random.Generator, *,
                   sigma: float = 16 / 255, blur: int = 3) -> np.ndarray:
  """A `blur` x `blur` box blur, then Gaussian noise of std `sigma` (in units
  of the full range), rounded and clipped back to uint8.

  Blurring first is the harder order: the noise is not averaged away.
  """
  x = image.astype(np.float32)
  if blur > 1:
    x = ndimage.uniform_filter(x, size=(blur, blur, 1), mode='nearest')
  x = x + rng.normal(0.0, sigma * 255.0, x.shape)
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def random_scene(rng: np.random.Generator, image_size: int,
                 layout: str) -> scene_lib.Scene:
  """1-4 objects, each of any palette colour and shape."""
  n = int(rng.integers(1, objects.MAX_OBJECTS + 1))
  items = [(objects.COLORS[int(rng.integers(len(objects.COLORS)))],
            objects.SHAPES[int(rng.integers(len(objects.SHAPES)))])
           for _ in range(n)]
  origins = scene_lib.sample_origins(rng, image_size, layout, n)
  return scene_lib.make_scene(image_size, layout, items, origins)


def detector_accuracy(num_scenes: int, *, image_size: int = 32,
                      layout: str = 'grid', corrupt: bool = False,
                      seed: int = 0) -> dict:
  """Object-level accuracy of `detect` on random scenes.

  A scene counts as exact when the detector finds the right number of
  objects and the multiset of their (colour, shape) equals the truth.

  Returns:
    {'scenes', 'scene_exact': fraction of exact scenes, 'objects',
     'object_recall', 'object_precision', 'unknown_blobs', 'errors': the five
     most common (truth, found) mismatches}.
  """
  rng = np.random.default_rng(seed)
  exact = matched = truth_total = found_total = unknown = 0
  errors = collections.Counter()
  for _ in range(num_scenes):
    scene = random_scene(rng, image_size, layout)
    image = scene_lib.render(scene)
    if corrupt:
      image = blur_and_noise(image, rng)
    found = detect(image)
    truth = collections.Counter((o.color, o.shape) for o in scene.objects)
    got = collections.Counter((d.color, d.shape) for d in found)
    matched += sum((truth & got).values())
    truth_total += len(scene.objects)
    found_total += len(found)
    unknown += sum(not d.known for d in found)
    if truth == got:
      exact += 1
    else:
      errors[(tuple(sorted(truth.elements())),
              tuple(sorted(got.elements())))] += 1
  return {'scenes': num_scenes, 'scene_exact': exact / num_scenes,
          'objects': truth_total, 'object_recall': matched / truth_total,
          'object_precision': matched / max(found_total, 1),
          'unknown_blobs': unknown,
          'errors': [[list(t), list(g), n] for (t, g), n in
                     errors.most_common(5)]}
