"""GenEval's rules on detections: strict pass/fail, partial credit, scores.

The rules follow GenEval (Ghosh et al. 2023, `evaluate_images.py`):
- an include requirement needs at least `count` objects of its shape (and
  colour: the colour must be bound to that shape, as in `color_attr`);
- an exclude requirement fails when `count` or more such objects are present
  (counting prompts exclude n + 1, so "exactly n" is checked);
- a position requirement needs every matched object to stand in the relation
  to every object matched by its target requirement, where relations come from
  bounding-box centres with a dead zone of 0.1 x (sum of the two boxes' sides).
One addition makes the reward harder to game: with `reject_unknown` (default)
a blob the detector could not classify fails the image, since GenEval's
detector would not silently accept garbage either.
"""

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from lvrpo_jax.world.detector import Detection
from lvrpo_jax.world.spec import TAGS, Requirement, Spec

POSITION_THRESHOLD = 0.1  # GenEval's dead zone, relative to box sides.
# The kinds of failed check (`Verdict.failures`): an include requirement
# short of its count ('missing'), an exclude requirement reached ('extra':
# too many for a counting prompt), objects found but not in the relation
# ('relation'), a blob the detector could not classify ('unclassified').
FAILURE_KINDS: tuple[str, ...] = ('missing', 'extra', 'relation',
                                  'unclassified')


def relative_position(box_a, box_b) -> set[str]:
  """Relations of box A with respect to box B under GenEval's dead zone.

  Args:
    box_a, box_b: (x0, y0, x1, y1), y growing downwards.

  Returns:
    A subset of {'left of', 'right of', 'above', 'below'}; empty when the
    centres are too close to tell.
  """
  a, b = np.asarray(box_a, float), np.asarray(box_b, float)
  offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
  dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
  revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0)
  revised *= np.sign(offset)
  if np.all(np.abs(revised) < 1e-3):
    return set()
  dx, dy = revised / np.linalg.norm(offset)
  relations = set()
  if dx < -0.5:
    relations.add('left of')
  if dx > 0.5:
    relations.add('right of')
  if dy < -0.5:
    relations.add('above')
  if dy > 0.5:
    relations.add('below')
  return relations


@dataclasses.dataclass(frozen=True)
class Verdict:
  """Outcome of checking one image against one spec.

  Attributes:
    passed: every requirement holds (GenEval's strict "correct").
    partial: fraction of checks that hold, in [0, 1].
    reasons: one line per failed check.
    failures: the kind of each failed check (FAILURE_KINDS), in the order
      of `reasons`.
  """
  passed: bool
  partial: float
  reasons: tuple[str, ...]
  failures: tuple[str, ...] = ()


def _matches(det: Detection, req: Requirement) -> bool:
  return det.shape == req.shape and (req.color is None
                                     or det.color == req.color)


def _describe(req: Requirement) -> str:
  return ' '.join(w for w in (req.color, req.shape) if w)


def verify(spec: Spec, detections: Sequence[Detection], *,
           reject_unknown: bool = True) -> Verdict:
  """Checks detections against a spec with GenEval's rules."""
  reasons, failures, checks = [], [], 0

  def fail(kind: str, reason: str) -> None:
    failures.append(kind)
    reasons.append(reason)

  groups: list[list[Detection] | None] = []
  for req in spec.include:
    checks += 1
    found = [d for d in detections if _matches(d, req)]
    ok = len(found) >= req.count
    if not ok:
      fail('missing', f'expected {_describe(req)} >= {req.count}, '
           f'found {len(found)}')
    elif req.relation is not None:
      targets = groups[req.target]
      if targets is None:
        ok = False
        fail('relation', f'no {_describe(spec.include[req.target])} to be '
             f'{req.relation}')
      elif not all(req.relation in relative_position(d.bbox, t.bbox)
                   for d in found for t in targets):
        ok = False
        fail('relation', f'{_describe(req)} not {req.relation} '
             f'{_describe(spec.include[req.target])}')
    groups.append(found if ok else None)
  for req in spec.exclude:
    checks += 1
    found = sum(_matches(d, req) for d in detections)
    if found >= req.count:
      fail('extra', f'expected {_describe(req)} < {req.count}, found {found}')
  if reject_unknown:
    checks += 1
    unknown = sum(not d.known for d in detections)
    if unknown:
      fail('unclassified', f'{unknown} unclassifiable blob(s)')
  return Verdict(not reasons, (checks - len(reasons)) / checks,
                 tuple(reasons), tuple(failures))


def geneval_scores(tags: Iterable[str],
                   passed: Iterable[bool]) -> dict[str, object]:
  """GenEval-style scores: per-tag accuracy and their mean ("overall").

  Returns:
    {'per_tag': {tag: accuracy}, 'counts': {tag: n}, 'overall': mean over the
    tags present}.
  """
  totals = {t: [0, 0] for t in TAGS}
  for tag, ok in zip(tags, passed, strict=True):
    if tag not in totals:
      raise ValueError(f'unknown GenEval tag {tag!r}; use one of {TAGS}')
    totals[tag][0] += bool(ok)
    totals[tag][1] += 1
  per_tag = {t: c / n for t, (c, n) in totals.items() if n}
  if not per_tag:
    raise ValueError('no samples to score')
  return {'per_tag': per_tag,
          'counts': {t: n for t, (_, n) in totals.items() if n},
          'overall': float(np.mean(list(per_tag.values())))}
