"""World examples and their splits: train, test, held-out compositions, val.

An example is one scene with everything said about it: a generation prompt
(the scene is a canonical image for it), its spec and GenEval tag, one
understanding question with its answer, and a caption.

Splits are functions of content, which makes them provably disjoint:
- `heldout` examples use a held-out composition in their prompt: a held-out
  (colour, shape) pair (`colors`, `color_attr`) or a held-out relation fact
  (`position`; a fact and its converse, 'triangle above circle' and 'circle
  below triangle', are held out together).
- `train` and `test` examples never show a held-out composition: not in the
  prompt, the question, nor the image (no held-out pair is drawn, and no two
  drawn objects stand in a held-out relation).
- `test` takes the examples whose *scene* hash falls in bucket 0 of
  `TEST_BUCKETS`, `train` the others: no image is in both splits (so no test
  question is asked of a training image), and test is an unbiased sample of
  the same distribution. Prompts do recur across splits, as they must: the
  grammar has only a few hundred of them.
- `val` is a second, independent draw from test's distribution (scenes in
  test's bucket, from its own random stream): what settings are chosen on,
  so that test's numbers stay an unbiased measure of the chosen ones. Its
  images are disjoint from train's and heldout's, but not from test's: the
  bucket holds few scenes (2,000 test examples show 1,156 distinct images,
  and 1,128 of 2,000 val images are among them), so images and prompts
  recur between the two as they do within test.
Example i of a split is drawn from a generator seeded by (seed, split, i,
attempt), so any example can be regenerated alone, in any order, anywhere.
"""

import dataclasses
import hashlib
import itertools

import numpy as np

from lvrpo_jax.world import objects
from lvrpo_jax.world import questions as questions_lib
from lvrpo_jax.world import scene as scene_lib
from lvrpo_jax.world import spec as spec_lib
from lvrpo_jax.world.verify import relative_position

# Appended only: a split's index seeds its examples.
SPLITS: tuple[str, ...] = ('train', 'test', 'heldout', 'val')
TEST_BUCKETS = 16
HELDOUT_TAGS: tuple[str, ...] = ('colors', 'color_attr', 'position')
_MIN_OBJECTS = {'single_object': 1, 'two_object': 2, 'counting': 2,
                'colors': 1, 'position': 2, 'color_attr': 2}
_MAX_ATTEMPTS = 10_000


@dataclasses.dataclass(frozen=True)
class Compositions:
  """Held-out compositions: (colour, shape) pairs and relation facts."""
  pairs: frozenset
  relations: frozenset  # (shape, relation, shape), converses included.

  @classmethod
  def parse(cls, pairs: tuple[str, ...],
            relations: tuple[str, ...]) -> 'Compositions':
    """From config strings: 'purple circle', 'triangle above circle',
    'circle left_of square' (underscores stand for spaces in relations)."""
    parsed_pairs = set()
    for text in pairs:
      words = text.split()
      if len(words) != 2:
        raise ValueError(f'held-out pair {text!r} must be "colour shape"')
      parsed_pairs.add((objects.check_color(words[0]),
                        objects.check_shape(words[1])))
    facts = set()
    for text in relations:
      words = text.split()
      relation = words[1].replace('_', ' ') if len(words) == 3 else None
      if relation not in spec_lib.RELATIONS:
        raise ValueError(f'held-out relation {text!r} must be "shape '
                         f'relation shape", relation in '
                         f'{[r.replace(" ", "_") for r in spec_lib.RELATIONS]}')
      a, b = objects.check_shape(words[0]), objects.check_shape(words[2])
      if a == b:
        raise ValueError(f'held-out relation {text!r} needs two shapes')
      facts.add((a, relation, b))
      facts.add((b, spec_lib.CONVERSE[relation], a))
    return cls(frozenset(parsed_pairs), frozenset(facts))

  def scene_facts(self, scene: scene_lib.Scene) -> set:
    size = scene.object_size
    return {(a.shape, r, b.shape)
            for a, b in itertools.permutations(scene.objects, 2)
            for r in relative_position(a.bbox(size), b.bbox(size))}

  def shows(self, scene: scene_lib.Scene) -> bool:
    """Whether the image shows any held-out composition."""
    if any((o.color, o.shape) in self.pairs for o in scene.objects):
      return True
    return bool(self.scene_facts(scene) & self.relations)

  def names(self, pairs, relations) -> bool:
    """Whether text naming `pairs` and `relations` uses a held-out one."""
    return bool(set(pairs) & self.pairs or set(relations) & self.relations)

  def allowed_pairs(self) -> list[tuple[str, str]]:
    return [p for p in itertools.product(objects.COLORS, objects.SHAPES)
            if p not in self.pairs]


@dataclasses.dataclass(frozen=True)
class WorldSpec:
  """What the example generator needs (built from `config.world`)."""
  image_size: int = 32
  layout: str = 'grid'
  max_objects: int = objects.MAX_OBJECTS
  seed: int = 0
  heldout: Compositions = Compositions(frozenset(), frozenset())
  # Train split only: the probability that a scene is asked a relation
  # first (otherwise, and where the scene has none, the families in random
  # order, as in every split).
  train_relation_first: float = 0.0

  def __post_init__(self):
    objects.check_image_size(self.image_size)
    if self.layout not in objects.LAYOUTS:
      raise ValueError(f'unknown layout {self.layout!r}; use {objects.LAYOUTS}')
    if not 0.0 <= self.train_relation_first <= 1.0:
      raise ValueError(f'train_relation_first={self.train_relation_first} '
                       'must be in [0, 1]')
    if not 1 <= self.max_objects <= objects.MAX_OBJECTS:
      raise ValueError(f'max_objects={self.max_objects} must be in '
                       f'[1, {objects.MAX_OBJECTS}]')

  @classmethod
  def from_config(cls, world, seed: int) -> 'WorldSpec':
    return cls(world.image_size, world.layout, world.max_objects, seed,
               Compositions.parse(tuple(world.heldout_pairs),
                                  tuple(world.heldout_relations)),
               world.train_relation_first)


@dataclasses.dataclass(frozen=True)
class Example:
  split: str
  index: int
  scene: scene_lib.Scene
  spec: spec_lib.Spec
  prompt: str
  question: questions_lib.Question
  caption: str

  @property
  def tag(self) -> str:
    return self.spec.tag

  def key(self) -> str:
    """Content identity of the whole example."""
    return f'{self.scene_key()}|{self.prompt}|{self.question.text}'

  def scene_key(self) -> str:
    """Identity of the image: what the train/test decision depends on."""
    return f'{self.scene.image_size}|{self.scene.layout}|{self.scene.objects}'


def content_bucket(key: str, buckets: int = TEST_BUCKETS) -> int:
  digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
  return int.from_bytes(digest, 'little') % buckets


def _pick(rng, seq):
  return seq[int(rng.integers(len(seq)))]


def _sample_spec(rng, tag, world: WorldSpec, heldout: bool):
  """A spec of `tag`; with `heldout` it uses a held-out composition."""
  comps = world.heldout
  pairs = sorted(comps.pairs) if heldout else comps.allowed_pairs()
  shapes = objects.SHAPES
  if tag == 'single_object':
    return spec_lib.single_object(_pick(rng, shapes))
  if tag == 'two_object':
    a, b = rng.choice(len(shapes), 2, replace=False)
    return spec_lib.two_object(shapes[a], shapes[b])
  if tag == 'counting':
    n = int(rng.integers(2, world.max_objects + 1))
    return spec_lib.counting(_pick(rng, shapes), n)
  if tag == 'colors':
    return spec_lib.colors(*_pick(rng, pairs))
  if tag == 'color_attr':
    first = _pick(rng, pairs)
    others = [p for p in (comps.allowed_pairs() + sorted(comps.pairs)
                          if heldout else pairs)
              if p[0] != first[0] and p[1] != first[1]]
    second = _pick(rng, others)
    if rng.random() < 0.5:
      first, second = second, first
    return spec_lib.color_attr(*first, *second)
  if tag == 'position':
    facts = sorted(comps.relations) if heldout else [
        (a, r, b) for a, b in itertools.permutations(shapes, 2)
        for r in spec_lib.RELATIONS if (a, r, b) not in comps.relations]
    return spec_lib.position(*_pick(rng, facts))
  raise ValueError(f'unknown tag {tag!r}')


def _scene_for(rng, spec, world: WorldSpec, heldout: bool):
  """A canonical scene for `spec`: exactly the objects it names, placed so
  the spec holds. Unless `heldout`, the scene shows no held-out composition
  (open colours avoid held-out pairs; placements avoid held-out relations).
  Returns None when no placement is found."""
  items = []
  for req in spec.include:
    colors = [c for c in objects.COLORS
              if heldout or (c, req.shape) not in world.heldout.pairs]
    for _ in range(req.count):
      items.append((req.color or _pick(rng, colors), req.shape))
  size = objects.object_size(world.image_size)
  box = lambda yx: (yx[1], yx[0], yx[1] + size, yx[0] + size)
  relations = [(i, req) for i, req in enumerate(spec.include) if req.relation]
  # A random placement satisfies a relation about 40% of the time on the
  # grid; retrying here keeps the tag mix uniform. Position specs name single
  # objects, so include[i] is items[i].
  for _ in range(100):
    origins = scene_lib.sample_origins(rng, world.image_size, world.layout,
                                       len(items))
    if all(req.relation in relative_position(box(origins[i]),
                                             box(origins[req.target]))
           for i, req in relations):
      scene = scene_lib.make_scene(world.image_size, world.layout, items,
                                   origins)
      if heldout or not world.heldout.shows(scene):
        return scene
  return None


def _ask(rng, scene, world: WorldSpec, split: str):
  # Families in random order: a scene that cannot serve one (no unique
  # object for 'color') falls through to a random other, not always 'count'.
  heldout = split == 'heldout'
  order = [questions_lib.FAMILIES[i]
           for i in rng.permutation(len(questions_lib.FAMILIES))]
  # Drawn only when it can matter, so the other splits' questions, and the
  # train split's at 0, stay those of a world without it.
  if (split == 'train' and world.train_relation_first
      and rng.random() < world.train_relation_first):
    order.insert(0, 'relation')
  allowed = None if heldout else world.heldout.allowed_pairs()
  for family in order:
    q = questions_lib.ask(rng, scene, family, allowed)
    if q is not None and (heldout or not world.heldout.names(
        q.pairs, q.relations)):
      return q
  return None


def make_example(world: WorldSpec, split: str, index: int) -> Example:
  """Example `index` of `split`, a pure function of its arguments."""
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; use one of {SPLITS}')
  heldout = split == 'heldout'
  if heldout and not (world.heldout.pairs or world.heldout.relations):
    raise ValueError('the heldout split needs held-out pairs or relations')
  tags = [t for t in (HELDOUT_TAGS if heldout else spec_lib.TAGS)
          if _MIN_OBJECTS[t] <= world.max_objects
          and (t != 'position' or world.heldout.relations or not heldout)
          and (t not in ('colors', 'color_attr') or world.heldout.pairs
               or not heldout)]
  for attempt in range(_MAX_ATTEMPTS):
    rng = np.random.default_rng(
        [world.seed, SPLITS.index(split), index, attempt])
    spec = _sample_spec(rng, _pick(rng, tags), world, heldout)
    scene = _scene_for(rng, spec, world, heldout)
    if scene is None:
      continue
    question = _ask(rng, scene, world, split)
    if question is None:
      continue
    ex = Example(split, index, scene, spec, spec_lib.prompt(spec, rng),
                 question, questions_lib.caption(scene))
    if heldout or ((content_bucket(ex.scene_key()) == 0)
                   == (split in ('test', 'val'))):
      return ex
  raise RuntimeError(f'no {split} example found for index {index} in '
                     f'{_MAX_ATTEMPTS} attempts; are too many compositions '
                     'held out?')
