"""Questions about images the world did not draw (e.g. a policy's own
generated ones), answered by what the world's detector reads in them."""

import numpy as np

from lvrpo_jax.world import detector
from lvrpo_jax.world import objects
from lvrpo_jax.world import questions as questions_lib
from lvrpo_jax.world import scene as scene_lib


def generated_questions(images, count: int, seed, layout: str,
                        novel=None, scenes=None):
  """Up to `count` (row, question) pairs about distinct images, each a
  question of a family drawn uniformly (another where the scene has none of
  it, e.g. a relation needs two objects) about what the world's detector
  reads in the image; images it cannot read as a scene
  (`detector.read_scene`) are passed over.
  The answers are exact for the image as drawn, whatever its prompt asked
  for, so the policy learns to read its own images: held-out compositions
  included, which no dataset image shows.

  Args:
    images: uint8 [N, S, S, 3].
    count: questions wanted.
    seed: numpy seed of the choice of images, families and questions.
    layout: the world's layout.
    novel: `examples.Compositions` or None. Given, the images that show one
      of them come first, each asked a question naming one where its scene
      allows: the answer prompts of the dataset never show these
      compositions, only the policy's own images can.
    scenes: the detector's reading of each image (`detector.read_scene`),
      where the caller has it already.
  """
  rng = np.random.default_rng(seed)
  order = [int(j) for j in rng.permutation(len(images))]
  images = np.asarray(images)
  if scenes is None:
    # Every image (the step's rewards then reuse these detections).
    scenes = [detector.read_scene(image, layout, found) for image, found in
              zip(images, detector.detect_batch(images))]
  novel_in = lambda scene: (novel is not None and scene is not None
                            and novel.shows(scene))
  # Stable: the seed's order within the novel images and the others.
  order.sort(key=lambda j: not novel_in(scenes[j]))
  asked = []
  for j in order:
    if len(asked) == count:
      break
    scene = scenes[j]
    if scene is None:
      continue
    candidates = [questions_lib.ask(rng, scene, str(family))
                  for family in rng.permutation(questions_lib.FAMILIES)]
    candidates = [q for q in candidates if q is not None]
    if novel_in(scene):
      candidates = [q for q in candidates
                    if novel.names(q.pairs, q.relations)] or candidates
    if candidates:
      asked.append((j, candidates[0]))
  return asked


def pasted_novel_objects(images, hosts, layout: str, novel, seed):
  """Host images with an object of a novel composition pasted in, the
  objects taken from `images` (e.g. the policy's own).

  A novel object drawn alone teaches nothing about binding: asked 'what
  color is the triangle ?' of an image with one cyan object, 'cyan' is
  right whichever object it names. Pasted into a scene with others, the
  question needs the object found by its shape. Each host gets one object
  (the novel objects in turn), its object box copied into a free grid
  cell: one that keeps `objects.FREE_LAYOUT_GAP` pixels from every host
  object in the free layout. A composite is kept only if the detector reads
  it as a scene that shows the novel composition; its answers then come
  from that reading (`generated_questions`), as for any generated image.

  Args:
    images: uint8 [N, S, S, 3], the source of novel objects.
    hosts: uint8 [M, S, S, 3], the images to paste into (e.g. dataset
      ones).
    layout: the world's layout.
    novel: `examples.Compositions`, the compositions to paste.
    seed: numpy seed of the free cell chosen in each host.

  Returns:
    A list of (host row, uint8 [S, S, 3] composite, its scene) in host
    order; hosts that have no free cell, or whose composite does not read
    as a scene with a novel object, are left out. Empty when no image
    shows a novel object.
  """
  images, hosts = np.asarray(images), np.asarray(hosts)
  size = images.shape[1]
  s = objects.object_size(size)
  is_novel = lambda o: (o.color, o.shape) in novel.pairs
  crops = []
  for image, found in zip(images, detector.detect_batch(images)):
    scene = detector.read_scene(image, layout, found)
    if scene is None:
      continue
    # An object cut by the image's edge reads with its box partly outside
    # (y0 = -1, say): it has no whole box to copy.
    crops += [image[o.y0:o.y0 + s, o.x0:o.x0 + s] for o in scene.objects
              if is_novel(o) and 0 <= o.y0 <= size - s
              and 0 <= o.x0 <= size - s]
  if not crops:
    return []
  rng = np.random.default_rng(seed)
  gap = objects.FREE_LAYOUT_GAP if layout == 'free' else 0
  cells = [scene_lib.grid_origin(size, c)
           for c in range(objects.GRID_CELLS ** 2)]
  out = []
  for row, host in enumerate(hosts):
    taken = [d.bbox for d in detector.detect(host)]  # (x0, y0, x1, y1)
    free = [(y, x) for y, x in cells if all(
        x + s + gap <= x0 or x1 + gap <= x or y + s + gap <= y0
        or y1 + gap <= y for x0, y0, x1, y1 in taken)]
    if not free or len(taken) >= objects.MAX_OBJECTS:
      continue
    y, x = free[int(rng.integers(len(free)))]
    composite = host.copy()
    composite[y:y + s, x:x + s] = crops[len(out) % len(crops)]
    scene = detector.read_scene(composite, layout)
    if scene is not None and any(map(is_novel, scene.objects)):
      out.append((row, composite, scene))
  return out


def contrast_questions(scenes, novel, seed):
  """(k, question) pairs: for scene k, the colour of one of its objects
  that is not of a novel composition (one whose shape is unique in the
  scene); scenes with none are passed over.

  Asked of scenes that show a novel object beside others: were every colour
  question about such a scene about its novel object, the answer would be
  the novel colour whichever shape the question names.
  """
  rng = np.random.default_rng(seed)
  asked = []
  for k, scene in enumerate(scenes):
    candidates = [q for q in questions_lib.color_questions(scene)
                  if not novel.names(q.pairs, q.relations)]
    if candidates:
      asked.append((k, candidates[int(rng.integers(len(candidates)))]))
  return asked
