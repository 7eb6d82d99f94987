"""Pipeline stages of the shapes world: `world` and `world_preview`.

  world          builds (or reuses) the TFDS dataset of every split and
                 writes WORKDIR/world_stats.json: example counts per split,
                 GenEval tag, question family and answer.
  world_preview  writes WORKDIR/world_preview.png: a grid of examples from
                 each split, every image captioned with its prompt or its
                 question and answer.
"""

import collections
import json
import os

import numpy as np
from PIL import Image

from lvrpo_jax import configs
from lvrpo_jax import metrics
from lvrpo_jax.world import dataset as dataset_lib
from lvrpo_jax.world import examples as examples_lib

STATS_FILE = 'world_stats.json'
PREVIEW_FILE = 'world_preview.png'


def world_and_sizes(config):
  """(WorldSpec, split sizes) of a validated config."""
  world = examples_lib.WorldSpec.from_config(config.world, config.seed)
  sizes = {'train': config.world.num_train, 'test': config.world.num_test,
           'heldout': config.world.num_heldout}
  # Only when asked for: a world without it keeps its dataset's name (and
  # is the world of every run before the split existed).
  if config.world.num_val:
    sizes['val'] = config.world.num_val
  return world, sizes


def split_stats(source) -> dict:
  """Counts per GenEval tag, question family and answer of one split."""
  counts = {k: collections.Counter() for k in ('tag', 'family', 'answer')}
  chunk = 1024  # Batched reads: a third cheaper than one by one.
  for start in range(0, len(source), chunk):
    indices = range(start, min(start + chunk, len(source)))
    for record in source.__getitems__(list(indices)):
      for key, counter in counts.items():
        counter[record[key].decode()] += 1
  return {'examples': len(source),
          **{f'per_{k}': dict(sorted(c.items())) for k, c in counts.items()}}


def dataset_stats(builder) -> dict:
  """Stats of every split, read back from the stored dataset once and kept
  beside it, so reusing a built dataset costs no second pass."""
  path = os.path.join(builder.data_dir, STATS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  sources = builder.as_data_source()
  stats = {split: split_stats(sources[split]) for split in sources}
  with open(path, 'w') as f:
    json.dump(stats, f, indent=2)
  return stats


def run_world(config, workdir: str) -> None:
  """Builds the dataset and writes WORKDIR/world_stats.json."""
  world, sizes = world_and_sizes(config)
  data_dir = configs.world_data_dir(config, workdir)
  builder = dataset_lib.build(world, sizes, data_dir)
  stats = {'data_dir': os.path.abspath(builder.data_dir),
           'config_name': builder.builder_config.name,
           'image_size': world.image_size, 'layout': world.layout,
           'heldout_pairs': sorted(' '.join(p) for p in world.heldout.pairs),
           'heldout_relations': sorted(' '.join(r)
                                       for r in world.heldout.relations),
           'splits': dataset_stats(builder)}
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, STATS_FILE)
  with open(path, 'w') as f:
    json.dump(stats, f, indent=2)
  print(f'  world: {sum(sizes.values())} examples in {builder.data_dir}; '
        f'stats in {path}', flush=True)


def _caption(record) -> str:
  """A generation prompt or a question and answer, half of each."""
  if np.random.default_rng(int(record['index'])).random() < 0.5:
    return 'gen: ' + record['prompt'].decode()
  return f"Q: {record['question'].decode()}\nA: {record['answer'].decode()}"


def preview_grid(records, columns: int, scale: int = 4) -> Image.Image:
  """A grid of captioned example tiles."""
  grid = metrics.image_grid(np.stack([r['image'] for r in records]), columns,
                            [_caption(r) for r in records], scale)
  return Image.fromarray(grid)


def run_world_preview(config, workdir: str) -> None:
  """Writes WORKDIR/world_preview.png from the built dataset."""
  world, sizes = world_and_sizes(config)
  data_dir = configs.world_data_dir(config, workdir)
  from lvrpo_jax.data import pipeline  # The reader, with its clear errors.
  per_split = -(-config.world.preview_examples // len(sizes))
  records = []
  for split in sizes:
    source = pipeline.open_split(world, sizes, data_dir, split)
    records += [source[i] for i in range(min(per_split, len(source)))]
  grid = preview_grid(records[:config.world.preview_examples], columns=6)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, PREVIEW_FILE)
  grid.save(path)
  print(f'  world_preview: {len(records)} examples in {path}', flush=True)
