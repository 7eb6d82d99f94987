"""The shapes world as a TFDS dataset: array_record files, no TensorFlow.

Only `tfds.features.Tensor` features are used (uint8 images, int32 arrays,
strings), which TFDS encodes and decodes without TensorFlow; the files are
read with `builder.as_data_source()` and Grain (`lvrpo_jax.data`).

A builder config is named after a hash of everything that determines the
content (world parameters and split sizes), so two different worlds never
share a directory and an identical one is built once and reused.
"""

import contextlib
import dataclasses
import hashlib
import multiprocessing
import os
import sys
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from lvrpo_jax.world import examples as examples_lib
from lvrpo_jax.world import objects
from lvrpo_jax.world import scene as scene_lib

_CHUNK = 256  # Examples per worker task.


def features(image_size: int) -> tfds.features.FeaturesDict:
  text = lambda: tfds.features.Tensor(shape=(), dtype=np.str_)
  return tfds.features.FeaturesDict({
      'index': tfds.features.Tensor(shape=(), dtype=np.int64),
      'image': tfds.features.Tensor(shape=(image_size, image_size, 3),
                                    dtype=np.uint8),
      'tag': text(),
      'spec': text(),  # JSON of world.spec.Spec.
      'prompt': text(),
      'family': text(),
      'question': text(),
      'answer': text(),
      'rationale': text(),  # '' for none (world.questions).
      'caption': text(),
      'object_colors': tfds.features.Tensor(shape=(None,), dtype=np.int32),
      'object_shapes': tfds.features.Tensor(shape=(None,), dtype=np.int32),
      'object_boxes': tfds.features.Tensor(shape=(None, 4), dtype=np.int32),
  })


def record(ex: examples_lib.Example) -> dict:
  """The feature dict of one example (indices into COLORS / SHAPES)."""
  objs = ex.scene.objects
  return {
      'index': ex.index,
      'image': scene_lib.render(ex.scene),
      'tag': ex.tag,
      'spec': ex.spec.to_json(),
      'prompt': ex.prompt,
      'family': ex.question.family,
      'question': ex.question.text,
      'answer': ex.question.answer,
      'rationale': ex.question.rationale,
      'caption': ex.caption,
      'object_colors': np.array([objects.COLORS.index(o.color) for o in objs],
                                np.int32),
      'object_shapes': np.array([objects.SHAPES.index(o.shape) for o in objs],
                                np.int32),
      'object_boxes': np.array(ex.scene.bboxes(), np.int32).reshape(-1, 4),
  }


def _records(args):
  """Worker task (module level, so processes can pickle it)."""
  world, split, start, stop = args
  return [record(examples_lib.make_example(world, split, i))
          for i in range(start, stop)]


@dataclasses.dataclass(repr=False)
class WorldConfig(tfds.core.BuilderConfig):
  world: examples_lib.WorldSpec | None = None
  sizes: tuple[tuple[str, int], ...] = ()
  processes: int = 1

  def __repr__(self):  # TFDS logs it; the name already identifies it.
    return f'WorldConfig({self.name!r}, splits={dict(self.sizes)})'


def config_for(world: examples_lib.WorldSpec, sizes: dict[str, int],
               processes: int = 1) -> WorldConfig:
  """A builder config whose name identifies the content."""
  sizes = tuple((s, int(sizes[s])) for s in examples_lib.SPLITS if s in sizes)
  # Sorted: a frozenset's repr order changes with string hash randomization.
  identity = repr((world.image_size, world.layout, world.max_objects,
                   world.seed, sorted(world.heldout.pairs),
                   sorted(world.heldout.relations), sizes,
                   world.train_relation_first)).encode()
  digest = hashlib.blake2b(identity, digest_size=6).hexdigest()
  name = f'{world.layout}{world.image_size}_{digest}'
  return WorldConfig(name=name, world=world, sizes=sizes, processes=processes,
                     description=f'{name} with splits {dict(sizes)}')


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
  """Procedural shapes-world examples (see lvrpo_jax.world.examples)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'First release.',
                   '1.1.0': 'Relation questions carry a rationale.'}
  BUILDER_CONFIGS = []  # Configs are made per world by `config_for`.

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, features=features(self.builder_config.world.image_size),
        description=__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the world is procedural.
    return {split: self._generate_examples(split, n)
            for split, n in self.builder_config.sizes}

  def _generate_examples(self, split: str, n: int) -> Iterator:
    world, processes = self.builder_config.world, self.builder_config.processes
    tasks = [(world, split, i, min(i + _CHUNK, n))
             for i in range(0, n, _CHUNK)]
    if processes > 1:
      # 'spawn' (not fork): the parent may have started JAX's threads.
      with multiprocessing.get_context('spawn').Pool(processes) as pool:
        for chunk in pool.imap(_records, tasks):
          yield from ((f'{split}-{r["index"]}', r) for r in chunk)
    else:
      for task in tasks:
        yield from ((f'{split}-{r["index"]}', r) for r in _records(task))


def build(world: examples_lib.WorldSpec, sizes: dict[str, int],
          data_dir: str, processes: int | None = None) -> ShapesWorld:
  """Builds (or reuses) the dataset; returns its prepared builder."""
  processes = processes or max(1, min(os.cpu_count() or 1, 8))
  builder = ShapesWorld(config=config_for(world, sizes, processes),
                        data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared():
    print(f'  building {sum(sizes.values())} examples with {processes} '
          f'process(es) in {builder.data_dir}', flush=True)
  # TFDS prints its banner to stdout: send it to stderr with its progress
  # bars, so stdout carries only the pipeline's own lines.
  with contextlib.redirect_stdout(sys.stderr):
    builder.download_and_prepare()
  return builder
