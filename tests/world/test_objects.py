"""The world's tables, sprites, geometry and renderer."""

import itertools

import numpy as np
import pytest

from lvrpo_jax.world import objects
from lvrpo_jax.world import scene as scene_lib


def test_palette_colours_are_clearly_separable():
  rgb = np.array([objects.BACKGROUND] + list(objects.PALETTE.values()), float)
  distances = [np.linalg.norm(a - b)
               for a, b in itertools.combinations(rgb, 2)]
  assert len(objects.PALETTE) >= 6
  assert min(distances) > 100  # ~6 noise sigmas of 16 per channel.


def test_sprite_pixels_counted_by_hand():
  # 7 px: the disc keeps 37 of 49 pixels (3 cut at each corner), the
  # triangle's rows are 1, 1, 3, 3, 5, 5, 7 wide.
  assert objects.sprite('square', 7).sum() == 49
  assert objects.sprite('circle', 7).sum() == 37
  assert objects.sprite('triangle', 7).sum(1).tolist() == [1, 1, 3, 3, 5, 5, 7]
  # Every sprite touches all sides of its box: the box is tight.
  for shape, size in itertools.product(objects.SHAPES, (7, 14, 28, 56)):
    mask = objects.sprite(shape, size)
    assert mask[0].any() and mask[-1].any()
    assert mask[:, 0].any() and mask[:, -1].any()


def test_sizes_scale_with_the_canvas():
  assert [objects.object_size(s) for s in objects.IMAGE_SIZES] == [7, 14, 28,
                                                                   56]
  assert [objects.cell_size(s) for s in objects.IMAGE_SIZES] == [8, 16, 32, 64]


def test_grid_origins_centre_objects_in_cells():
  assert scene_lib.grid_origin(32, 0) == (0, 0)
  assert scene_lib.grid_origin(32, 5) == (8, 8)
  assert scene_lib.grid_origin(64, 15) == (49, 49)  # 3 * 16 + (16 - 14) // 2


def test_render_draws_exactly_the_sprites():
  scene = scene_lib.make_scene(32, 'grid', [('red', 'circle'),
                                            ('blue', 'triangle')],
                               [(0, 0), (8, 16)])
  image = scene_lib.render(scene)
  assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
  expected = np.empty_like(image)
  expected[...] = objects.BACKGROUND
  expected[0:7, 0:7][objects.sprite('circle', 7)] = objects.PALETTE['red']
  expected[8:15, 16:23][objects.sprite('triangle', 7)] = objects.PALETTE[
      'blue']
  np.testing.assert_array_equal(image, expected)


@pytest.mark.parametrize('layout, size', [('grid', 32), ('free', 32),
                                          ('free', 64)])
def test_sampled_objects_never_overlap(layout, size):
  rng = np.random.default_rng(0)
  s = objects.object_size(size)
  gap = 1 if layout == 'grid' else objects.FREE_LAYOUT_GAP
  for _ in range(300):
    origins = scene_lib.sample_origins(rng, size, layout, 4)
    for (ay, ax), (by, bx) in itertools.combinations(origins, 2):
      assert abs(ay - by) >= s + gap or abs(ax - bx) >= s + gap
    assert all(0 <= v <= size - s for o in origins for v in o)


def test_same_scene_same_bytes():
  make = lambda seed: scene_lib.render(scene_lib.make_scene(
      32, 'free', [('green', 'square')],
      scene_lib.sample_origins(np.random.default_rng(seed), 32, 'free', 1)))
  assert make(3).tobytes() == make(3).tobytes()


@pytest.mark.parametrize('call, message', [
    (lambda: objects.object_size(48), 'image_size=48'),
    (lambda: objects.sprite('star', 7), "'star'"),
    (lambda: scene_lib.make_scene(32, 'grid', [('pink', 'circle')], [(0, 0)]),
     "'pink'"),
    (lambda: scene_lib.sample_origins(np.random.default_rng(0), 32, 'ring',
                                      1), "'ring'"),
])
def test_bad_values_are_named(call, message):
  with pytest.raises(ValueError, match=message):
    call()
