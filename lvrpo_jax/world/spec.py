"""Generation prompts: structured specs, GenEval tags and their wording.

A `Spec` follows GenEval's metadata: `include` requirements (a shape, a count,
optionally a colour and a position relative to an earlier requirement) and
`exclude` requirements (fail when `count` or more such objects are present,
which is how "exactly n" is checked). `prompt(spec, rng)` words a spec from a
small grammar and `parse_prompt(text)` inverts it, so any grammatical prompt
(from a file, say) gets its exact spec back.
"""

import dataclasses
import json

import numpy as np

from lvrpo_jax.world import objects

TAGS: tuple[str, ...] = ('single_object', 'two_object', 'counting', 'colors',
                         'position', 'color_attr')
RELATIONS: tuple[str, ...] = ('left of', 'right of', 'above', 'below')
CONVERSE = {'left of': 'right of', 'right of': 'left of', 'above': 'below',
            'below': 'above'}
NUMBERS: tuple[str, ...] = ('zero', 'one', 'two', 'three', 'four')
PREFIXES: tuple[str, ...] = ('a photo of', 'an image of', 'a picture of', '')


@dataclasses.dataclass(frozen=True)
class Requirement:
  """`count` objects of `shape` (and `color`), optionally placed `relation`
  (one of RELATIONS) to the objects matched by include[`target`]."""
  shape: str
  count: int = 1
  color: str | None = None
  relation: str | None = None
  target: int | None = None

  def __post_init__(self):
    objects.check_shape(self.shape)
    if self.color is not None:
      objects.check_color(self.color)
    # Up to len(NUMBERS): an exclude of "four" objects checks for five.
    if not 1 <= self.count <= len(NUMBERS):
      raise ValueError(f'count={self.count} must be in [1, {len(NUMBERS)}]')
    if (self.relation is None) != (self.target is None):
      raise ValueError('relation and target must be given together, got '
                       f'relation={self.relation!r}, target={self.target!r}')
    if self.relation is not None and self.relation not in RELATIONS:
      raise ValueError(f'unknown relation {self.relation!r}; use {RELATIONS}')


@dataclasses.dataclass(frozen=True)
class Spec:
  tag: str
  include: tuple[Requirement, ...]
  exclude: tuple[Requirement, ...] = ()

  def __post_init__(self):
    if self.tag not in TAGS:
      raise ValueError(f'unknown GenEval tag {self.tag!r}; use one of {TAGS}')
    for i, req in enumerate(self.include):
      if req.target is not None and not 0 <= req.target < i:
        raise ValueError(f'include[{i}].target={req.target} must name an '
                         'earlier requirement')

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> 'Spec':
    data = json.loads(text)
    return cls(data['tag'], tuple(Requirement(**r) for r in data['include']),
               tuple(Requirement(**r) for r in data['exclude']))

  def named_objects(self) -> int:
    """How many objects the prompt names (the include counts): its
    canonical scene shows exactly these and nothing else."""
    return sum(r.count for r in self.include)

  def pairs(self) -> set[tuple[str, str]]:
    """(colour, shape) pairs the spec names."""
    return {(r.color, r.shape) for r in self.include if r.color is not None}

  def relations(self) -> set[tuple[str, str, str]]:
    """(shape, relation, target shape) facts the spec asks for."""
    return {(r.shape, r.relation, self.include[r.target].shape)
            for r in self.include if r.relation is not None}


def single_object(shape):
  return Spec('single_object', (Requirement(shape),))


def two_object(shape_a, shape_b):
  return Spec('two_object', (Requirement(shape_a), Requirement(shape_b)))


def counting(shape, n):
  """Exactly n: at least n present and not n + 1 (GenEval's exclude)."""
  return Spec('counting', (Requirement(shape, n),),
              (Requirement(shape, n + 1),))


def colors(color, shape):
  return Spec('colors', (Requirement(shape, color=color),))


def position(shape, relation, target_shape):
  """`shape` placed `relation` the `target_shape` (GenEval: 'a photo of a dog
  right of a cat' requires the dog right of the cat)."""
  return Spec('position', (Requirement(target_shape),
                           Requirement(shape, relation=relation, target=0)))


def color_attr(color_a, shape_a, color_b, shape_b):
  return Spec('color_attr', (Requirement(shape_a, color=color_a),
                             Requirement(shape_b, color=color_b)))


def plural(shape: str) -> str:
  return shape + 's'


def _noun_phrase(req: Requirement) -> str:
  words = ([req.color] if req.color else []) + [req.shape]
  if req.count == 1:
    article = 'an' if words[0][0] in 'aeiou' else 'a'
    return ' '.join([article] + words)
  return ' '.join([NUMBERS[req.count]] + words[:-1] + [plural(req.shape)])


def prompt(spec: Spec, rng: np.random.Generator | None = None) -> str:
  """Words `spec`; `rng` picks the prefix ('a photo of', ...), or the first."""
  prefix = PREFIXES[int(rng.integers(len(PREFIXES)))] if rng else PREFIXES[0]
  inc = spec.include
  if spec.tag == 'position':
    body = f'{_noun_phrase(inc[1])} {inc[1].relation} {_noun_phrase(inc[0])}'
  else:
    body = ' and '.join(_noun_phrase(r) for r in inc)
  return f'{prefix} {body}'.strip()


def _parse_noun_phrase(words: list[str]) -> Requirement:
  if not words:
    raise ValueError('empty noun phrase')
  head, rest = words[0], words[1:]
  if head in ('a', 'an'):
    count = 1
  elif head in NUMBERS[2:]:
    count = NUMBERS.index(head)
  else:
    raise ValueError(f'expected an article or a number, got {head!r}')
  color = rest.pop(0) if len(rest) == 2 else None
  if len(rest) != 1:
    raise ValueError(f'cannot parse noun phrase {" ".join(words)!r}')
  noun = rest[0]
  shape = noun[:-1] if count > 1 and noun.endswith('s') else noun
  if count > 1 and not noun.endswith('s'):
    raise ValueError(f'expected a plural after {head!r}, got {noun!r}')
  if color is not None:
    objects.check_color(color)
  return Requirement(objects.check_shape(shape), count, color)


def parse_prompt(text: str) -> Spec:
  """Inverse of `prompt`: the spec of a grammatical prompt.

  Raises:
    ValueError: naming the part of `text` that is not in the grammar.
  """
  body = ' '.join(text.split())
  for prefix in PREFIXES[:-1]:
    if body == prefix or body.startswith(prefix + ' '):
      body = body[len(prefix) + 1:]
      break
  if not body:
    raise ValueError(f'prompt {text!r} names no object')
  for relation in RELATIONS:
    if f' {relation} ' in body:
      left, right = body.split(f' {relation} ', 1)
      subject = _parse_noun_phrase(left.split())
      target = _parse_noun_phrase(right.split())
      if subject.count != 1 or target.count != 1 or subject.color or (
          target.color):
        raise ValueError(f'position prompts name two single uncoloured '
                         f'objects: {text!r}')
      return position(subject.shape, relation, target.shape)
  parts = [_parse_noun_phrase(p.split()) for p in body.split(' and ')]
  if len(parts) == 1:
    (req,) = parts
    if req.count > 1:
      if req.color:
        raise ValueError(f'counting prompts have no colour: {text!r}')
      return counting(req.shape, req.count)
    return colors(req.color, req.shape) if req.color else single_object(
        req.shape)
  if len(parts) == 2 and all(p.count == 1 for p in parts):
    a, b = parts
    if a.color and b.color:
      return color_attr(a.color, a.shape, b.color, b.shape)
    if not a.color and not b.color:
      return two_object(a.shape, b.shape)
  raise ValueError(f'prompt is not in the world grammar: {text!r}')
