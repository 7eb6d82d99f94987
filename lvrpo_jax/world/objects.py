"""The shapes world's fixed tables: palette, shapes, sizes and sprites.

Everything that defines what an object *looks like* lives here, in one place,
so the renderer and the detector cannot drift apart. The README reproduces the
palette table.

Geometry (all in pixels, for a square canvas of side S):
  object side  s = 7 * S / 32        (7, 14, 28, 56 for S = 32 .. 256)
  grid cell    c = S / 4             (4 x 4 cells; one f8 latent each at 32)
A grid object is centred in its cell; at S = 32 that leaves a 1 px gap between
neighbours, so same-colour neighbours never touch on a clean render.
"""

import functools

import numpy as np

# Colours are far apart in RGB (minimum pairwise distance ~104, ~150 from the
# background) so per-pixel nearest-colour labelling survives sigma = 16/255
# noise with a wide margin. Orange sits between red and yellow by nature; it is
# kept because GenEval-style colour prompts need more than primaries.
PALETTE: dict[str, tuple[int, int, int]] = {
    'red': (225, 30, 30),
    'orange': (250, 135, 0),
    'yellow': (240, 230, 40),
    'green': (30, 180, 40),
    'cyan': (30, 215, 225),
    'blue': (35, 75, 235),
    'purple': (155, 40, 215),
    'white': (245, 245, 245),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ('circle', 'square', 'triangle')
BACKGROUND: tuple[int, int, int] = (30, 30, 30)

IMAGE_SIZES: tuple[int, ...] = (32, 64, 128, 256)
GRID_CELLS = 4  # The grid layout is GRID_CELLS x GRID_CELLS cells.
LAYOUTS: tuple[str, ...] = ('grid', 'free')
MAX_OBJECTS = 4
# In the free layout, bounding boxes keep at least this many pixels apart, so
# a 3x3 blur cannot bridge two objects.
FREE_LAYOUT_GAP = 2


def check_image_size(image_size: int) -> int:
  """Returns `image_size` or raises ValueError if it is not supported."""
  if image_size not in IMAGE_SIZES:
    raise ValueError(
        f'image_size={image_size!r} is not supported; use one of {IMAGE_SIZES}')
  return image_size


def check_color(color: str) -> str:
  if color not in PALETTE:
    raise ValueError(f'unknown colour {color!r}; the palette is {COLORS}')
  return color


def check_shape(shape: str) -> str:
  if shape not in SHAPES:
    raise ValueError(f'unknown shape {shape!r}; shapes are {SHAPES}')
  return shape


def object_size(image_size: int) -> int:
  """Side s of every object's bounding box on an S x S canvas."""
  return 7 * check_image_size(image_size) // 32


def cell_size(image_size: int) -> int:
  """Side c of a grid cell on an S x S canvas."""
  return check_image_size(image_size) // GRID_CELLS


@functools.cache
def sprite(shape: str, size: int) -> np.ndarray:
  """Boolean mask [size, size] of `shape`, rasterized at pixel centres.

  circle: inscribed disc; square: the full box; triangle: isosceles, apex at
  the top centre, base along the bottom row. Every sprite touches all four
  sides of its box, so the box is the object's tight bounding box.
  """
  check_shape(shape)
  centres = np.arange(size) + 0.5  # Pixel centres in box coordinates.
  y, x = np.meshgrid(centres, centres, indexing='ij')
  half = size / 2
  if shape == 'square':
    mask = np.ones((size, size), bool)
  elif shape == 'circle':
    mask = (x - half) ** 2 + (y - half) ** 2 <= half**2
  else:  # triangle: half-width grows linearly from 0 at the apex to s/2;
    # at least half a pixel, so an even-sized apex row holds 2 pixels.
    mask = np.abs(x - half) <= np.maximum(y / 2, 0.5)
  mask.setflags(write=False)
  return mask
