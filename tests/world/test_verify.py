"""Tests of GenEval's rules on detections (world/verify.py)."""

import math

import numpy as np
import pytest

from lvrpo_jax.world import examples
from lvrpo_jax.world import scene as scene_lib
from lvrpo_jax.world import spec as spec_lib
from lvrpo_jax.world.detector import UNKNOWN, Detection, detect
from lvrpo_jax.world.verify import (POSITION_THRESHOLD, geneval_scores,
                                    relative_position, verify)


def _box(x0, y0, side=7):
  return (x0, y0, x0 + side, y0 + side)


def _det(color, shape, x0, y0, side=7):
  """A hand-made detection of a `side`-px object with top-left (x0, y0)."""
  return Detection(color, shape, _box(x0, y0, side),
                   (x0 + side / 2, y0 + side / 2), 1.0)


def _reference_relations(a, b, threshold=0.1):
  """GenEval's `relative_position` (evaluate_images.py), in plain math."""
  off_x = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2
  off_y = (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
  sum_w = (a[2] - a[0]) + (b[2] - b[0])
  sum_h = (a[3] - a[1]) + (b[3] - b[1])
  rev_x = math.copysign(max(abs(off_x) - threshold * sum_w, 0.0), off_x)
  rev_y = math.copysign(max(abs(off_y) - threshold * sum_h, 0.0), off_y)
  if abs(rev_x) < 1e-3 and abs(rev_y) < 1e-3:
    return set()
  norm = math.hypot(off_x, off_y)
  dx, dy = rev_x / norm, rev_y / norm
  return ({'left of'} if dx < -0.5 else set()) | (
      {'right of'} if dx > 0.5 else set()) | (
          {'above'} if dy < -0.5 else set()) | (
              {'below'} if dy > 0.5 else set())


def test_threshold_is_genevals():
  assert POSITION_THRESHOLD == 0.1


@pytest.mark.parametrize('box_a, box_b, expected', [
    # Side by side, centre offset (-8, 0): dx = -(8 - 1.4) / 8 = -0.825.
    (_box(0, 0), _box(8, 0), {'left of'}),
    (_box(8, 0), _box(0, 0), {'right of'}),
    (_box(0, 0), _box(0, 8), {'above'}),
    (_box(0, 8), _box(0, 0), {'below'}),
    # Offset 1 < dead zone 0.1 * (7 + 7) = 1.4: too close to tell.
    (_box(1, 0), _box(0, 0), set()),
    (_box(1, 1), _box(0, 0), set()),
    # Diagonal (8, 8): (8 - 1.4) / |(8, 8)| = 6.6 / 11.314 = 0.583 > 0.5.
    (_box(8, 8), _box(0, 0), {'right of', 'below'}),
    (_box(0, 0), _box(8, 8), {'left of', 'above'}),
    # (16, 8): dx = 14.6 / 17.889 = 0.816, dy = 6.6 / 17.889 = 0.369.
    (_box(16, 8), _box(0, 0), {'right of'}),
    (_box(8, 16), _box(0, 0), {'below'}),
    # (16, -8): dy = -0.369, still only a horizontal relation.
    (_box(16, 0), _box(0, 8), {'right of'}),
    # Pure horizontal offset 2, sides 7: dx = 0.6 / 2 = 0.3 <= 0.5, outside
    # the dead zone yet no relation; offset 3: dx = 1.6 / 3 = 0.533.
    (_box(2, 0), _box(0, 0), set()),
    (_box(3, 0), _box(0, 0), {'right of'}),
    # Sides 5 + 5, dead zone exactly 1.0: offset 2 gives dx = 1 / 2 = 0.5,
    # which is not > 0.5; offset 3 gives 2 / 3.
    (_box(2, 0, 5), _box(0, 0, 5), set()),
    (_box(0, 0, 5), _box(2, 0, 5), set()),
    (_box(3, 0, 5), _box(0, 0, 5), {'right of'}),
    (_box(0, 0, 5), _box(0, 3, 5), {'above'}),
    # Offset (3, 4), |offset| = 5. Widths 2 + 3: dead zone 0.5 in x, so
    # dx = (3 - 0.5) / 5 = 0.5 exactly (no relation); heights 5 + 5: dead
    # zone 1, dy = 3 / 5 = 0.6.
    ((3.5, 4, 5.5, 9), (0, 0, 3, 5), {'below'}),
    # Widths 1 + 3: dead zone 0.4, dx = 2.6 / 5 = 0.52.
    ((4, 4, 5, 9), (0, 0, 3, 5), {'right of', 'below'}),
    # Different sizes: A (0,0,4,4) centre (2,2), B (6,0,20,14) centre (13,7);
    # offset (-11, -5), dead zones 1.8 (x) and 1.8 (y), |offset| = 12.083:
    # dx = -9.2 / 12.083 = -0.761, dy = -3.2 / 12.083 = -0.265.
    ((0, 0, 4, 4), (6, 0, 20, 14), {'left of'}),
])
def test_relative_position_hand_computed(box_a, box_b, expected):
  assert relative_position(box_a, box_b) == expected


def test_relative_position_matches_reference_on_random_boxes():
  rng = np.random.default_rng(0)
  nonempty = 0
  for i in range(400):
    boxes = []
    for _ in range(2):
      x0, y0 = rng.integers(0, 32, 2)
      w, h = rng.integers(1, 16, 2)
      if i % 2:  # Half the pairs off the pixel grid (blurred detections).
        x0, y0 = x0 + rng.random(), y0 + rng.random()
      boxes.append((float(x0), float(y0), float(x0 + w), float(y0 + h)))
    a, b = boxes
    got = relative_position(a, b)
    assert got == _reference_relations(a, b), (a, b)
    nonempty += bool(got)
  # The random pairs must exercise the relations, not only the dead zone.
  assert nonempty > 200


def test_relative_position_converse():
  rng = np.random.default_rng(1)
  for _ in range(200):
    a = _box(*rng.integers(0, 25, 2))
    b = _box(*rng.integers(0, 25, 2))
    assert relative_position(b, a) == {
        spec_lib.CONVERSE[r] for r in relative_position(a, b)}


# verify(): detections are built by hand so these tests check the rules, not
# the detector.


@pytest.mark.parametrize('n', [2, 3, 4])
def test_counting_is_exact(n):
  spec = spec_lib.counting('circle', n)
  # Circles on one row (distinct cells), plus an unrelated square.
  circles = lambda k: [_det('red', 'circle', 8 * i, 0) for i in range(k)]
  square = [_det('blue', 'square', 0, 16)]
  # Checks: one include, one exclude, one for unknown blobs.
  exact = verify(spec, circles(n) + square)
  assert exact.passed and exact.partial == 1.0 and exact.reasons == ()
  assert exact.failures == ()
  more = verify(spec, circles(n + 1) + square)
  assert not more.passed
  assert more.partial == pytest.approx(2 / 3)
  assert more.reasons == (f'expected circle < {n + 1}, found {n + 1}',)
  assert more.failures == ('extra',)
  fewer = verify(spec, circles(n - 1) + square)
  assert not fewer.passed
  assert fewer.partial == pytest.approx(2 / 3)
  assert fewer.reasons == (f'expected circle >= {n}, found {n - 1}',)
  assert fewer.failures == ('missing',)


def test_colour_must_be_bound_to_the_shape():
  spec = spec_lib.colors('red', 'circle')
  wrong = verify(spec, [_det('red', 'square', 0, 0),
                        _det('blue', 'circle', 8, 0)])
  assert not wrong.passed
  assert wrong.partial == pytest.approx(1 / 2)
  assert len(wrong.reasons) == 1 and 'red circle' in wrong.reasons[0]
  right = verify(spec, [_det('red', 'square', 0, 0),
                        _det('red', 'circle', 8, 0)])
  assert right.passed and right.partial == 1.0


def test_color_attr_needs_both_bindings():
  spec = spec_lib.color_attr('red', 'circle', 'blue', 'square')
  good = [_det('red', 'circle', 0, 0), _det('blue', 'square', 8, 0)]
  assert verify(spec, good).passed
  swapped = [_det('blue', 'circle', 0, 0), _det('red', 'square', 8, 0)]
  verdict = verify(spec, swapped)
  assert not verdict.passed
  assert verdict.partial == pytest.approx(1 / 3)
  assert len(verdict.reasons) == 2
  half = [_det('red', 'circle', 0, 0), _det('red', 'square', 8, 0)]
  verdict = verify(spec, half)
  assert not verdict.passed
  assert verdict.partial == pytest.approx(2 / 3)
  assert len(verdict.reasons) == 1 and 'blue square' in verdict.reasons[0]


def test_position_needs_every_subject_against_every_target():
  spec = spec_lib.position('circle', 'left of', 'square')
  square = _det('green', 'square', 16, 0)
  left = _det('red', 'circle', 0, 0)
  assert verify(spec, [left, square]).passed
  # (0, 8) vs (16, 0): dx = -0.816, dy = -0.369; still left of.
  also_left = _det('blue', 'circle', 0, 8)
  assert verify(spec, [left, also_left, square]).passed
  right = _det('blue', 'circle', 24, 0)
  verdict = verify(spec, [left, right, square])
  assert not verdict.passed
  assert verdict.partial == pytest.approx(2 / 3)
  assert verdict.reasons == ('circle not left of square',)
  assert verdict.failures == ('relation',)
  # A second square below-left of the circle: the circle is not left of it.
  other_square = _det('green', 'square', 0, 16)
  assert not verify(spec, [_det('red', 'circle', 8, 0), square,
                           other_square]).passed
  # Wrong way round entirely.
  assert not verify(spec, [right, square]).passed
  # Dead zone: a circle 1 px left of the square is in no relation to it.
  assert not verify(spec, [_det('red', 'circle', 15, 8),
                           _det('green', 'square', 16, 8)]).passed


def test_position_without_its_target_fails():
  spec = spec_lib.position('circle', 'left of', 'square')
  dets = [_det('red', 'circle', 0, 0), _det('red', 'triangle', 16, 0)]
  verdict = verify(spec, dets)
  assert not verdict.passed
  # The square check fails, and the circle's relation has nothing to hold
  # against: 1 of 3 checks (the unknown-blob check) holds.
  assert verdict.partial == pytest.approx(1 / 3)
  assert verdict.reasons == ('expected square >= 1, found 0',
                             'no square to be left of')
  assert verdict.failures == ('missing', 'relation')
  verdict = verify(spec, dets, reject_unknown=False)
  assert verdict.partial == 0.0


def test_unknown_blobs():
  spec = spec_lib.single_object('circle')
  blob = Detection(UNKNOWN, UNKNOWN, (16, 16, 25, 22), (20.0, 19.0), 0.3)
  dets = [_det('red', 'circle', 0, 0), blob]
  strict = verify(spec, dets)
  assert not strict.passed
  assert strict.partial == pytest.approx(1 / 2)
  assert strict.reasons == ('1 unclassifiable blob(s)',)
  assert strict.failures == ('unclassified',)
  lenient = verify(spec, dets, reject_unknown=False)
  assert lenient.passed and lenient.partial == 1.0
  # A blob of known shape but unknown colour is unknown too, and does not
  # satisfy a colour requirement.
  odd = Detection(UNKNOWN, 'circle', _box(0, 0), (3.5, 3.5), 0.9)
  assert not odd.known
  assert not verify(spec_lib.colors('red', 'circle'), [odd],
                    reject_unknown=False).passed
  two = verify(spec, dets + [blob])
  assert two.reasons == ('2 unclassifiable blob(s)',)


def test_partial_credit_counts_every_check():
  # counting(square, 2) with 3 squares and an unknown blob: include holds,
  # exclude fails, unknown fails -> 1 / 3 (or 1 / 2 without the unknown check).
  spec = spec_lib.counting('square', 2)
  dets = [_det('red', 'square', 8 * i, 0) for i in range(3)]
  dets.append(Detection(UNKNOWN, UNKNOWN, _box(0, 16), (3.5, 19.5), 0.1))
  verdict = verify(spec, dets)
  assert verdict.partial == pytest.approx(1 / 3)
  assert len(verdict.reasons) == 2
  assert verify(spec, dets, reject_unknown=False).partial == pytest.approx(
      1 / 2)
  # Nothing detected for a two_object spec: 1 of 3 checks holds.
  verdict = verify(spec_lib.two_object('circle', 'triangle'), [])
  assert not verdict.passed and verdict.partial == pytest.approx(1 / 3)
  assert len(verdict.reasons) == 2


def test_geneval_scores_hand_computed():
  tags = ['colors', 'colors', 'position', 'counting', 'counting', 'counting',
          'colors', 'colors']
  passed = [True, False, True, True, False, False, False, True]
  scores = geneval_scores(tags, passed)
  assert scores['per_tag'] == {'colors': 0.5, 'position': 1.0,
                               'counting': pytest.approx(1 / 3)}
  assert scores['counts'] == {'colors': 4, 'position': 1, 'counting': 3}
  # The mean over present tags (GenEval's overall), not over samples (4 / 8).
  assert scores['overall'] == pytest.approx((0.5 + 1.0 + 1 / 3) / 3)


def test_geneval_scores_bad_input():
  with pytest.raises(ValueError, match="'colours'"):
    geneval_scores(['colors', 'colours'], [True, True])
  with pytest.raises(ValueError, match='no samples'):
    geneval_scores([], [])
  with pytest.raises(ValueError):
    geneval_scores(['colors'], [True, False])


_WORLD = examples.WorldSpec(heldout=examples.Compositions.parse(
    ('purple circle', 'orange square', 'cyan triangle'),
    ('triangle above circle', 'circle left_of square')))


@pytest.mark.parametrize('world', [
    _WORLD,
    examples.WorldSpec(image_size=32, layout='free', seed=3,
                       heldout=_WORLD.heldout),
    examples.WorldSpec(image_size=64, layout='free', seed=4,
                       heldout=_WORLD.heldout),
], ids=['grid32', 'free32', 'free64'])
def test_canonical_images_pass_their_spec(world):
  n = 50 if world is _WORLD else 15
  tags = set()
  for split in examples.SPLITS:
    for i in range(n):
      ex = examples.make_example(world, split, i)
      verdict = verify(ex.spec, detect(scene_lib.render(ex.scene)))
      assert verdict.passed, (split, i, ex.prompt, ex.scene, verdict.reasons)
      tags.add(ex.tag)
  assert tags == set(spec_lib.TAGS)
