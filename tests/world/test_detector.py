"""Detector tests: exact on clean renders, robust, honest about what it can't
classify, and strict about its input."""

import numpy as np
import pytest

from lvrpo_jax.world import objects
from lvrpo_jax.world import robustness
from lvrpo_jax.world import scene as scene_lib
from lvrpo_jax.world.detector import (UNKNOWN, detect, detect_batch,
                                      read_scene)


def _scene(items, origins, size=32, layout='grid'):
  return scene_lib.make_scene(size, layout, items, origins)


@pytest.mark.parametrize('size, layout, n', [(32, 'grid', 400),
                                             (32, 'free', 200),
                                             (64, 'free', 60),
                                             (256, 'grid', 4)])
def test_exact_on_clean_renders(size, layout, n):
  rng = np.random.default_rng(size + n)
  for _ in range(n):
    scene = robustness.random_scene(rng, size, layout)
    found = detect(scene_lib.render(scene))
    # Same objects and the same boxes, pixel for pixel.
    assert sorted((d.bbox, d.color, d.shape) for d in found) == sorted(
        (o.bbox(scene.object_size), o.color, o.shape) for o in scene.objects)


def test_centroid_is_the_mass_centre():
  scene = _scene([('red', 'triangle')], [(8, 16)])
  (det,) = detect(scene_lib.render(scene))
  ys, xs = np.nonzero(objects.sprite('triangle', 7))
  assert det.centroid == pytest.approx((16 + xs.mean() + 0.5,
                                        8 + ys.mean() + 0.5))


def test_robust_to_noise_and_blur_on_a_fixed_seed_set():
  stats = robustness.detector_accuracy(300, corrupt=True, seed=7)
  assert stats['scene_exact'] >= 0.95, stats


def test_blur_bridged_same_colour_neighbours_are_split():
  # Grid neighbours are 1 px apart: a 3x3 blur bridges two red squares into
  # one 15 x 7 blob, which the detector must split at the cores.
  scene = _scene([('red', 'square'), ('red', 'square')], [(8, 0), (8, 8)])
  image = robustness.blur_and_noise(scene_lib.render(scene),
                                    np.random.default_rng(0), sigma=0.0)
  found = detect(image)
  assert [(d.color, d.shape) for d in found] == [('red', 'square')] * 2
  assert [d.bbox for d in found] == [(0, 8, 7, 15), (8, 8, 15, 15)]


def _canvas(size=32):
  image = np.empty((size, size, 3), np.uint8)
  image[...] = objects.BACKGROUND
  return image


def test_a_blob_of_no_shape_is_reported_unknown():
  image = _canvas()
  image[10:13, 4:20] = objects.PALETTE['green']  # A 3 x 16 bar.
  (det,) = detect(image)
  assert (det.color, det.shape) == ('green', UNKNOWN)
  assert det.bbox == (4, 10, 20, 13)
  assert not det.known


def test_read_scene_returns_the_rendered_scene_or_none():
  rng = np.random.default_rng(7)
  for layout in ('grid', 'free'):
    for _ in range(50):
      scene = robustness.random_scene(rng, 32, layout)
      assert read_scene(scene_lib.render(scene), layout) == scene
  assert read_scene(_canvas(), 'grid') is None  # No object.
  image = scene_lib.render(_scene([('red', 'circle')], [(0, 0)]))
  image[20:23, 4:20] = objects.PALETTE['green']  # And an unreadable bar.
  assert read_scene(image, 'grid') is None
  # Five objects: more than a scene holds, so no count could be answered.
  image = scene_lib.render(_scene([('red', 'square')] * 4,
                                  [(0, 0), (0, 8), (0, 16), (0, 24)]))
  image[20:27, 4:11] = objects.PALETTE['blue']  # A 7 x 7 blue square.
  assert len(detect(image)) == 5
  assert read_scene(image, 'grid') is None


def test_detect_batch_detects_each_image_and_keeps_the_last_batch():
  rng = np.random.default_rng(3)
  images = np.stack([scene_lib.render(robustness.random_scene(rng, 32,
                                                              'grid'))
                     for _ in range(4)])
  found = detect_batch(images)
  assert found == [detect(image) for image in images]
  assert detect_batch(images.copy()) is found  # Same bytes: kept.
  other = detect_batch(images[::-1])
  assert other is not found and other == found[::-1]


def test_an_oversized_shape_is_reported_unknown():
  image = _canvas(64)
  big = objects.sprite('circle', 28)  # 2x the 64-px world's object size.
  image[4:32, 4:32][big] = objects.PALETTE['blue']
  (det,) = detect(image)
  assert (det.color, det.shape) == ('blue', UNKNOWN)


def test_an_off_palette_colour_is_reported_unknown():
  image = _canvas()
  # Brown lies on no colour's background segment within tolerance.
  image[8:15, 8:15] = (140, 90, 40)
  (det,) = detect(image)
  assert det.color == UNKNOWN


def test_specks_are_ignored_but_objects_are_not():
  image = _canvas()
  image[3:5, 3:5] = objects.PALETTE['red']  # 4 px < 15% of 7 x 7.
  image[20:27, 20:27] = objects.PALETTE['red']
  assert [(d.color, d.shape) for d in detect(image)] == [('red', 'square')]


def test_empty_image_has_no_detections():
  assert detect(_canvas()) == []


@pytest.mark.parametrize('image, message', [
    (np.zeros((32, 32, 3), np.float32), 'dtype must be uint8, got float32'),
    (np.zeros((32, 32), np.uint8), 'got [32, 32]'),
    (np.zeros((32, 32, 4), np.uint8), 'got [32, 32, 4]'),
    (np.zeros((32, 64, 3), np.uint8), 'got [32, 64, 3]'),
    (np.zeros((48, 48, 3), np.uint8), 'got [48, 48, 3]'),
    ([[0]], 'numpy array, got list'),
])
def test_bad_images_are_rejected_by_name(image, message):
  with pytest.raises(ValueError, match=message.replace('[', r'\[')):
    detect(image)


@pytest.mark.slow
def test_accuracy_on_10000_scenes():
  """The issue's acceptance figures (also in benchmarks/world.py)."""
  clean = robustness.detector_accuracy(10_000, corrupt=False, seed=1)
  noisy = robustness.detector_accuracy(10_000, corrupt=True, seed=2)
  print(f"\nclean scene-exact {clean['scene_exact']:.4%}, "
        f"noise+blur scene-exact {noisy['scene_exact']:.4%}")
  assert clean['scene_exact'] >= 0.999, clean
  assert noisy['scene_exact'] >= 0.95, noisy
