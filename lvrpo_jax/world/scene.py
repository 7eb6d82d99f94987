"""Scenes: a few coloured shapes on a plain canvas, their placement and pixels.

A `Scene` is pure data (hashable, comparable), so the same scene always renders
to the same bytes and a split can be decided from a scene's content alone.
"""

import dataclasses
from typing import Sequence

import numpy as np

from lvrpo_jax.world import objects


@dataclasses.dataclass(frozen=True, order=True)
class SceneObject:
  """One object: its colour, shape and the top-left corner of its box.

  Every object's box is `objects.object_size(image_size)` pixels square.
  """
  y0: int
  x0: int
  color: str
  shape: str

  def bbox(self, size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in pixels, x1/y1 exclusive."""
    return (self.x0, self.y0, self.x0 + size, self.y0 + size)


@dataclasses.dataclass(frozen=True)
class Scene:
  image_size: int
  layout: str
  objects: tuple[SceneObject, ...]

  @property
  def object_size(self) -> int:
    return objects.object_size(self.image_size)

  def bboxes(self) -> list[tuple[int, int, int, int]]:
    return [o.bbox(self.object_size) for o in self.objects]


def render(scene: Scene) -> np.ndarray:
  """Draws `scene`; returns uint8 [S, S, 3]."""
  size = scene.image_size
  canvas = np.empty((size, size, 3), np.uint8)
  canvas[...] = objects.BACKGROUND
  s = scene.object_size
  for obj in scene.objects:
    window = canvas[obj.y0:obj.y0 + s, obj.x0:obj.x0 + s]
    window[objects.sprite(obj.shape, s)] = objects.PALETTE[obj.color]
  return canvas


def grid_origin(image_size: int, cell: int) -> tuple[int, int]:
  """Top-left (y0, x0) of the object centred in grid cell `cell` (row-major)."""
  c, s = objects.cell_size(image_size), objects.object_size(image_size)
  row, col = divmod(cell, objects.GRID_CELLS)
  pad = (c - s) // 2
  return row * c + pad, col * c + pad


def sample_origins(rng: np.random.Generator, image_size: int, layout: str,
                   n: int) -> list[tuple[int, int]]:
  """Draws n non-overlapping object origins (y0, x0) for `layout`."""
  if not 1 <= n <= objects.MAX_OBJECTS:
    raise ValueError(f'number of objects n={n} must be in '
                     f'[1, {objects.MAX_OBJECTS}]')
  if layout == 'grid':
    cells = rng.choice(objects.GRID_CELLS**2, size=n, replace=False)
    return [grid_origin(image_size, int(c)) for c in cells]
  if layout == 'free':
    return _free_origins(rng, image_size, n)
  raise ValueError(f'unknown layout {layout!r}; use one of {objects.LAYOUTS}')


def _free_origins(rng, image_size, n):
  s, gap = objects.object_size(image_size), objects.FREE_LAYOUT_GAP
  hi = image_size - s + 1
  # Four 7-px objects with 2-px gaps fit easily on a 32-px canvas, so
  # restarting on a dead end terminates quickly; the bound only guards bugs.
  for _ in range(1000):
    origins = []
    for _ in range(100):
      y, x = (int(v) for v in rng.integers(0, hi, size=2))
      if all(abs(y - oy) >= s + gap or abs(x - ox) >= s + gap
             for oy, ox in origins):
        origins.append((y, x))
        if len(origins) == n:
          return origins
  raise RuntimeError(f'could not place {n} objects on a {image_size} canvas')


def make_scene(image_size: int, layout: str,
               items: Sequence[tuple[str, str]],
               origins: Sequence[tuple[int, int]]) -> Scene:
  """Builds a scene from (colour, shape) items and their origins."""
  objects.check_image_size(image_size)
  objs = []
  for (color, shape), (y0, x0) in zip(items, origins, strict=True):
    objs.append(SceneObject(y0, x0, objects.check_color(color),
                            objects.check_shape(shape)))
  # Canonical order (reading order) so equal scenes compare and hash equal.
  return Scene(image_size, layout, tuple(sorted(objs)))
