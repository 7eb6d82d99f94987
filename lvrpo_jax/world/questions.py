"""Understanding questions with exact answers, and whole-scene captions.

Question families (answers in brackets):
  count     'how many circles are there ?'            [zero .. four]
            'how many red objects are there ?'
  color     'what color is the square ?'               [a colour]
  shape     'what shape is the red object ?'           [a shape]
  exists    'is there a blue triangle ?'               [yes | no]
  relation  'is the red circle left of the blue square ?'  [yes | no]
Answers are computed from the scene itself (relations with GenEval's dead
zone), never from how the scene was sampled.

A relation question also carries a rationale: the grid cells (row, column)
of its two objects as number words, 'one zero one two' for the answer
'one zero one two yes'. Spelled out before the answer, it breaks the
relation into steps a small model learns one at a time (reading each
object's cell, then comparing four words), where the bare answer asks for
both look-ups and the comparison at once (README, "Can the model learn
relations?").
"""

import dataclasses
import itertools

import numpy as np

from lvrpo_jax.world import objects
from lvrpo_jax.world.scene import Scene
from lvrpo_jax.world.spec import NUMBERS, RELATIONS, plural
from lvrpo_jax.world.verify import relative_position

FAMILIES: tuple[str, ...] = ('count', 'color', 'shape', 'exists', 'relation')


@dataclasses.dataclass(frozen=True)
class Question:
  """A question about a scene.

  Attributes:
    family: one of FAMILIES.
    text: the question, words separated by single spaces.
    answer: the exact answer (one word).
    pairs: (colour, shape) pairs the text names.
    relations: (shape, relation, shape) facts the text names.
    rationale: words that lead to the answer ('' for none; see above).
  """
  family: str
  text: str
  answer: str
  pairs: frozenset = frozenset()
  relations: frozenset = frozenset()
  rationale: str = ''

  def reply(self, rationale: bool) -> str:
    """The answer as a model is taught to give it: after the rationale
    when `rationale` and there is one."""
    return reply(self.answer, self.rationale if rationale else '')


# Words of a rationale before the answer: two grid cells, (row, column) each.
RATIONALE_WORDS = 4
# How a model is asked and replies wherever it answers (the eval stage,
# LVRPO's answer rollouts, r_kn's judge): question ids left-padded to
# QUESTION_LEN; replies of at most a rationale, one word and <eos>
# (decoding stops at <eos>, so a bare answer is one word and <eos>).
QUESTION_LEN = 14
ANSWER_TOKENS = RATIONALE_WORDS + 2


def reply(answer: str, rationale: str = '') -> str:
  """A taught reply: the answer after its rationale ('' for none)."""
  return f'{rationale} {answer}' if rationale else answer


def answer_word(text: str) -> str:
  """The answer in a reply: its last word ('' for an empty reply)."""
  words = text.split()
  return words[-1] if words else ''


def cell_words(obj, image_size: int) -> str:
  """'<row> <column>' of the grid cell holding `obj`'s centre."""
  cell = objects.cell_size(image_size)
  half = objects.object_size(image_size) // 2
  return (f'{NUMBERS[(obj.y0 + half) // cell]} '
          f'{NUMBERS[(obj.x0 + half) // cell]}')


def _article(word: str) -> str:
  return 'an' if word[0] in 'aeiou' else 'a'


def _count(rng, scene: Scene):
  # Mostly about something present, so 'zero' does not dominate the answers.
  present = rng.random() < 0.8
  if rng.random() < 0.5:
    pool = sorted({o.shape for o in scene.objects}) if present else (
        objects.SHAPES)
    shape = pool[int(rng.integers(len(pool)))]
    n = sum(o.shape == shape for o in scene.objects)
    return Question('count', f'how many {plural(shape)} are there ?',
                    NUMBERS[n])
  pool = sorted({o.color for o in scene.objects}) if present else (
      objects.COLORS)
  color = pool[int(rng.integers(len(pool)))]
  n = sum(o.color == color for o in scene.objects)
  return Question('count', f'how many {color} objects are there ?', NUMBERS[n])


def _unique(scene: Scene, key):
  values = [key(o) for o in scene.objects]
  return [o for o, v in zip(scene.objects, values) if values.count(v) == 1]


def _color(rng, scene: Scene):
  candidates = color_questions(scene)
  if not candidates:
    return None
  return candidates[int(rng.integers(len(candidates)))]


def color_questions(scene: Scene) -> list[Question]:
  """'what color is the <shape> ?' about every object whose shape is unique
  in the scene, in the scene's order."""
  return [Question('color', f'what color is the {o.shape} ?', o.color,
                   frozenset({(o.color, o.shape)}))
          for o in _unique(scene, lambda o: o.shape)]


def _shape(rng, scene: Scene):
  candidates = _unique(scene, lambda o: o.color)
  if not candidates:
    return None
  obj = candidates[int(rng.integers(len(candidates)))]
  return Question('shape', f'what shape is the {obj.color} object ?',
                  obj.shape, frozenset({(obj.color, obj.shape)}))


def _exists(rng, scene: Scene, allowed_pairs):
  present = sorted({(o.color, o.shape) for o in scene.objects})
  absent = sorted(set(allowed_pairs) - set(present))
  want_yes = rng.random() < 0.5 or not absent
  pool = present if want_yes else absent
  color, shape = pool[int(rng.integers(len(pool)))]
  return Question('exists', f'is there {_article(color)} {color} {shape} ?',
                  'yes' if want_yes else 'no', frozenset({(color, shape)}))


def _relation(rng, scene: Scene):
  unique = _unique(scene, lambda o: (o.color, o.shape))
  if len(unique) < 2:
    return None
  pairs = list(itertools.permutations(unique, 2))
  a, b = pairs[int(rng.integers(len(pairs)))]
  size = scene.object_size
  true = relative_position(a.bbox(size), b.bbox(size))
  false = [r for r in RELATIONS if r not in true]
  want_yes = bool(true) and (rng.random() < 0.5 or not false)
  pool = sorted(true) if want_yes else false
  relation = pool[int(rng.integers(len(pool)))]
  text = (f'is the {a.color} {a.shape} {relation} the {b.color} {b.shape} ?')
  return Question('relation', text, 'yes' if want_yes else 'no',
                  frozenset({(a.color, a.shape), (b.color, b.shape)}),
                  frozenset({(a.shape, relation, b.shape)}),
                  rationale=(f'{cell_words(a, scene.image_size)} '
                             f'{cell_words(b, scene.image_size)}'))


def ask(rng: np.random.Generator, scene: Scene, family: str,
        allowed_pairs=None) -> Question | None:
  """A question of `family` about `scene`, or None if the scene has none.

  Args:
    allowed_pairs: (colour, shape) pairs an `exists` question may name when
      its answer is 'no' (default: all).
  """
  if family == 'count':
    return _count(rng, scene)
  if family == 'color':
    return _color(rng, scene)
  if family == 'shape':
    return _shape(rng, scene)
  if family == 'exists':
    if allowed_pairs is None:
      allowed_pairs = itertools.product(objects.COLORS, objects.SHAPES)
    return _exists(rng, scene, list(allowed_pairs))
  if family == 'relation':
    return _relation(rng, scene)
  raise ValueError(f'unknown question family {family!r}; use one of '
                   f'{FAMILIES}')


def caption(scene: Scene) -> str:
  """Describes every object in reading order: 'a red circle , a blue square
  and two green triangles' (neighbours alike in colour and shape merge)."""
  groups = [(k, len(list(g))) for k, g in itertools.groupby(
      (o.color, o.shape) for o in scene.objects)]
  phrases = []
  for (color, shape), n in groups:
    if n == 1:
      phrases.append(f'{_article(color)} {color} {shape}')
    else:
      phrases.append(f'{NUMBERS[n]} {color} {plural(shape)}')
  if len(phrases) == 1:
    return phrases[0]
  return ' , '.join(phrases[:-1]) + ' and ' + phrases[-1]
