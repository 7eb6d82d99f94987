"""Object detector for shapes-world images.

Colour segmentation + connected components + shape classification:

1. Every pixel gets the nearest of BACKGROUND and the palette colours.
2. Each colour's connected components (8-connected) are candidate objects;
   components smaller than `SPECK_FRACTION` of an object's box are specks
   (noise, blur fringes between two colours) and are dropped.
3. A component too large for one object is split at its cores: blur can
   bridge the 1 px gap between same-colour grid neighbours, but their cores
   (pixels whose colour is nearly pure) stay apart.
4. Each object's shape is the best normalized cross-correlation of its colour
   coverage ("alpha": the pixel's projection on the colour-background axis)
   with the sprites of `objects.py`, sharp and 3x3-blurred, within +-1 px of
   the mass centroid. A blob whose best correlation, area or colour is not
   convincing is reported with `UNKNOWN` rather than guessed.

On clean renders the detector is exact (bounding boxes included); the
benchmark and slow tests measure it under noise and blur.
"""

import dataclasses
import functools
import hashlib

import numpy as np
from scipy import ndimage

from lvrpo_jax.world import objects
from lvrpo_jax.world import scene as scene_lib

UNKNOWN = 'unknown'
SPECK_FRACTION = 0.15  # Components under this fraction of s*s are noise.
MIN_CORRELATION = 0.8  # Below it, a blob's shape is UNKNOWN.
AREA_RANGE = (0.6, 1.5)  # Soft area / sprite area accepted for a shape.
COLOR_TOLERANCE = 60.0  # Max RGB distance of a blob's colour to the palette.
CORE_ALPHA = 0.83  # Coverage of a "core" pixel (between 2/3 and 1).
_EIGHT = np.ones((3, 3), bool)
_PAD = 2  # Template margin around the object's box, in pixels.


@dataclasses.dataclass(frozen=True)
class Detection:
  """One detected object.

  Attributes:
    color: a PALETTE name, or UNKNOWN.
    shape: a SHAPES name, or UNKNOWN.
    bbox: (x0, y0, x1, y1) in pixels, x1/y1 exclusive. For a classified object
      it is the box of the best-matching sprite; otherwise the blob's extent.
    centroid: (x, y) of the colour coverage, in pixels (pixel centres at +.5).
    score: the best template correlation in [-1, 1].
  """
  color: str
  shape: str
  bbox: tuple[int, int, int, int]
  centroid: tuple[float, float]
  score: float

  @property
  def known(self) -> bool:
    return self.color != UNKNOWN and self.shape != UNKNOWN


def check_image(image) -> np.ndarray:
  """Raises ValueError unless `image` is a uint8 [S, S, 3] world image."""
  if not isinstance(image, np.ndarray):
    raise ValueError(f'image must be a numpy array, got {type(image).__name__}')
  if image.dtype != np.uint8:
    raise ValueError(f'image dtype must be uint8, got {image.dtype}')
  if (image.ndim != 3 or image.shape[2] != 3
      or image.shape[0] != image.shape[1]
      or image.shape[0] not in objects.IMAGE_SIZES):
    raise ValueError(
        f'image shape must be [S, S, 3] with S in {objects.IMAGE_SIZES}, '
        f'got {list(image.shape)}')
  return image


@functools.cache
def _colors():
  """Palette matrix [K+1, 3] (row 0 = background) and alpha axes [K+1, 3]."""
  rgb = np.array([objects.BACKGROUND] + list(objects.PALETTE.values()),
                 np.float32)
  axes = rgb - rgb[0]
  axes[1:] /= (axes[1:] ** 2).sum(-1, keepdims=True)
  return rgb, axes


@functools.cache
def _templates(size: int):
  """Zero-mean, unit-norm sprite templates [2 * len(SHAPES), L, L]."""
  side = size + 2 * _PAD
  bank = []
  for shape in objects.SHAPES:
    sharp = np.zeros((side, side), np.float32)
    sharp[_PAD:_PAD + size, _PAD:_PAD + size] = objects.sprite(shape, size)
    bank += [sharp, ndimage.uniform_filter(sharp, 3, mode='constant')]
  bank = np.stack(bank)
  mass = bank.sum((1, 2))
  grid = np.arange(side) + 0.5
  cy = (bank.sum(2) * grid).sum(1) / mass
  cx = (bank.sum(1) * grid).sum(1) / mass
  bank -= bank.mean((1, 2), keepdims=True)
  bank /= np.sqrt((bank**2).sum((1, 2), keepdims=True))
  areas = np.array([objects.sprite(s, size).sum() for s in objects.SHAPES])
  return bank, cy, cx, areas


def detect(image: np.ndarray) -> list[Detection]:
  """Detects the objects of a world image.

  Args:
    image: uint8 [S, S, 3], S in objects.IMAGE_SIZES.

  Returns:
    Detections in reading order (top to bottom, then left to right).
  """
  check_image(image)
  labels, alphas = _label_pixels(image)
  size = objects.object_size(image.shape[0])
  speck = SPECK_FRACTION * size * size
  # One labelling of all foreground; a component holding several colours
  # (touching objects, or blur fringes labelled as a neighbouring hue) is
  # relabelled per colour. Most components hold one colour.
  comps, _ = ndimage.label(labels > 0, _EIGHT)
  found = []
  for i, window in enumerate(ndimage.find_objects(comps), start=1):
    sub = np.where(comps[window] == i, labels[window], 0)
    counts = np.bincount(sub.ravel(), minlength=len(objects.COLORS) + 1)
    colors = [k for k in range(1, len(counts)) if counts[k] >= speck]
    for k in colors:
      blob = sub == k
      parts = [blob]
      if counts[k] < counts[1:].sum():
        split, n = ndimage.label(blob, _EIGHT)
        parts = [split == j for j in range(1, n + 1)]
      for part in parts:
        if part.sum() < speck:
          continue
        for region in _split(part, alphas[window][..., k - 1], size):
          found.append(_classify(image, labels, k, alphas[..., k - 1],
                                 window, region, size))
  found.sort(key=lambda d: (d.bbox[1], d.bbox[0]))
  return found


def detect_batch(images) -> list[list[Detection]]:
  """`detect` on each image of uint8 [N, S, S, 3].

  The last batch's detections are kept, keyed by the images' bytes: an
  LVRPO step reads its generated images twice, to ask questions about them
  and to reward them, and detection is most of the reward time. The lists
  are shared with later calls: do not modify them.
  """
  images = np.asarray(images)
  key = (images.shape, images.dtype.str,
         hashlib.blake2b(images.tobytes(), digest_size=16).digest())
  if _LAST_BATCH.get('key') != key:
    _LAST_BATCH.clear()
    _LAST_BATCH.update(key=key, found=[detect(image) for image in images])
  return _LAST_BATCH['found']


_LAST_BATCH = {}


def read_scene(image: np.ndarray, layout: str,
               found: list[Detection] | None = None) -> scene_lib.Scene | None:
  """The scene the detector reads in `image` (e.g. a generated one), or
  None when it finds no object, more than a scene holds (the world's
  numbers stop at MAX_OBJECTS), or an object whose colour or shape is
  UNKNOWN: questions about such an image would have no exact answer.

  Args:
    image: uint8 [S, S, 3].
    layout: the world's layout, recorded in the scene.
    found: `detect(image)` when the caller has it already.
  """
  found = detect(image) if found is None else found
  if (not found or len(found) > objects.MAX_OBJECTS
      or not all(d.known for d in found)):
    return None
  return scene_lib.Scene(image.shape[0], layout, tuple(sorted(
      scene_lib.SceneObject(d.bbox[1], d.bbox[0], d.color, d.shape)
      for d in found)))


def _label_pixels(image):
  """Per-pixel colour labels [S, S] (0 = background) and alphas [S, S, K].

  A pixel belongs to the colour whose background-to-colour segment passes
  closest to it, not to the nearest palette point: blur mixes a colour with
  the background along that segment, and a half-mixed yellow is nearer to
  orange than to yellow, but it lies on yellow's segment.
  """
  rgb, axes = _colors()
  offset = image.reshape(-1, 3).astype(np.float32) - rgb[0]
  alpha = offset @ axes[1:].T  # [P, K] projections on each colour's axis.
  clipped = np.clip(alpha, 0.0, 1.0)
  # |offset - a span|^2 = |offset|^2 + |span|^2 a (a - 2 alpha), a = clipped
  # alpha, since offset.span = alpha |span|^2; |offset|^2 is common to all k.
  residual = _span_sq() * clipped * (clipped - 2.0 * alpha)
  best = residual.argmin(-1)
  on = alpha.ravel()[np.arange(len(best)) * alpha.shape[1] + best] >= 0.5
  labels = np.where(on, best + 1, 0).reshape(image.shape[:2])
  return labels, alpha.reshape(image.shape[:2] + (-1,))


@functools.cache
def _span_sq():
  rgb, _ = _colors()
  return ((rgb[1:] - rgb[0]) ** 2).sum(-1)


def _split(blob, alpha, size):
  """Splits a blob too large for one object at its cores; yields masks."""
  rows, cols = np.flatnonzero(blob.any(1)), np.flatnonzero(blob.any(0))
  if max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= 1.5 * size:
    yield blob
    return
  cores, n = ndimage.label(blob & (alpha >= CORE_ALPHA), _EIGHT)
  if n < 2:
    yield blob
    return
  # Every blob pixel joins its nearest core (ties go to the lower index).
  _, (iy, ix) = ndimage.distance_transform_edt(cores == 0, return_indices=True)
  owner = np.where(blob, cores[iy, ix], 0)
  for j in range(1, n + 1):
    part = owner == j
    if part.sum() >= SPECK_FRACTION * size * size:
      yield part


def _classify(image, labels, k, alpha, window, region, size):
  """Classifies one object region (a mask inside `window`)."""
  # Work in the window grown by one pixel: the reach of the blur fringe.
  h, w = labels.shape
  y0, x0 = max(window[0].start - 1, 0), max(window[1].start - 1, 0)
  y1, x1 = min(window[0].stop + 1, h), min(window[1].stop + 1, w)
  own = np.zeros((y1 - y0, x1 - x0), bool)
  oy, ox = window[0].start - y0, window[1].start - x0
  own[oy:oy + region.shape[0], ox:ox + region.shape[1]] = region
  # Grow the region by the fringe: 1 px, onto background pixels only.
  fringe = _dilate(own) & (labels[y0:y1, x0:x1] == 0)
  coverage = np.where(own | fringe, alpha[y0:y1, x0:x1], 0.0)
  area = float(coverage.sum())
  gy = np.arange(y0, y1) + 0.5
  gx = np.arange(x0, x1) + 0.5
  cy = float(coverage.sum(1) @ gy / area)
  cx = float(coverage.sum(0) @ gx / area)
  ys, xs = np.nonzero(own)
  extent = (int(xs.min() + x0), int(ys.min() + y0), int(xs.max() + x0 + 1),
            int(ys.max() + y0 + 1))
  color = _color_name(image[y0:y1, x0:x1], own & (coverage >= CORE_ALPHA), k)
  shape, bbox, score = _match_shape(coverage, cy - y0, cx - x0, area, size)
  if shape == UNKNOWN:
    bbox = extent
  else:
    bbox = (bbox[0] + x0, bbox[1] + y0, bbox[2] + x0, bbox[3] + y0)
  return Detection(color, shape, bbox, (cx, cy), score)


def _dilate(mask):
  """3x3 binary dilation, zero outside (cheaper than ndimage for tiny masks)."""
  h, w = mask.shape
  padded = np.zeros((h + 2, w + 2), bool)
  padded[1:-1, 1:-1] = mask
  rows = padded[:-2] | padded[1:-1] | padded[2:]
  return rows[:, :-2] | rows[:, 1:-1] | rows[:, 2:]


def _color_name(image, core, k):
  """The palette name of colour k if the blob's core really has that colour."""
  if not core.any():
    return UNKNOWN
  rgb, _ = _colors()
  mean = image[core].astype(np.float32).mean(0)
  if np.linalg.norm(mean - rgb[k]) > COLOR_TOLERANCE:
    return UNKNOWN
  return objects.COLORS[k - 1]


def _match_shape(coverage, cy, cx, area, size):
  """Best sprite for a coverage map; returns (shape, bbox, score).

  Every template is tried at every top-left corner within +-1 px of where its
  centroid meets the blob's (the union over templates: a few positions). The
  templates are zero-mean, so the correlation's numerator needs no patch mean.
  """
  bank, tcy, tcx, areas = _templates(size)
  side = bank.shape[-1]
  ys = np.round(cy - tcy).astype(int)
  xs = np.round(cx - tcx).astype(int)
  ylo, xlo = ys.min() - 1, xs.min() - 1
  ny, nx = ys.max() + 2 - ylo, xs.max() + 2 - xlo
  region = _crop(coverage, ylo, xlo, ny - 1 + side, nx - 1 + side)
  # All ny * nx windows [n, L*L]; as_strided (a view) then a copying reshape.
  patches = np.lib.stride_tricks.as_strided(
      region, (ny, nx, side, side), region.strides * 2).reshape(ny * nx, -1)
  sums = patches.sum(1)
  norms = np.sqrt(np.maximum((patches**2).sum(1) - sums**2 / side**2, 1e-12))
  scores = (bank.reshape(len(bank), -1) @ patches.T / norms).reshape(
      len(bank), ny, nx)
  t, iy, ix = np.unravel_index(np.argmax(scores), scores.shape)
  score = float(scores[t, iy, ix])
  shape_index = t // 2
  ratio = area / areas[shape_index]
  if score < MIN_CORRELATION or not AREA_RANGE[0] <= ratio <= AREA_RANGE[1]:
    return UNKNOWN, None, score
  top, left = int(ylo + iy + _PAD), int(xlo + ix + _PAD)
  return (objects.SHAPES[shape_index], (left, top, left + size, top + size),
          score)


def _crop(array, y0, x0, height, width):
  """array[y0:y0+height, x0:x0+width], zero where it leaves the array."""
  out = np.zeros((height, width), array.dtype)
  h, w = array.shape
  sy, sx = max(y0, 0), max(x0, 0)
  ey, ex = min(y0 + height, h), min(x0 + width, w)
  if sy < ey and sx < ex:
    out[sy - y0:ey - y0, sx - x0:ex - x0] = array[sy:ey, sx:ex]
  return out
