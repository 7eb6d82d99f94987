"""Grain input pipelines over the shapes-world dataset.

    source = open_split(world, sizes, data_dir, 'train')
    ds = batches(source, batch_size=64, seed=0)
    it = iter(ds)
    batch = next(it)            # dict of numpy arrays, leading dim 64
    state = it.get_state()      # checkpointable: it.set_state(state) resumes

Shuffling is a seeded global permutation, reseeded each epoch, so the order
depends on (seed, epoch) only. Each process then reads every
`shard_count`-th element of that one stream from `shard_index` (by default
jax.process_index() of jax.process_count()): the processes' batches i
together hold exactly elements [i B, (i + 1) B) of the stream, B the global
batch size, whatever the number of processes, so a multi-host run trains on
the same global batches as a single process (in another row order, which
per-example random keys make irrelevant).
"""

from absl import flags
import numpy as np
import grain

from lvrpo_jax.world import dataset as dataset_lib
from lvrpo_jax.world import examples as examples_lib
from lvrpo_jax.world import objects

TEXT_FIELDS = ('tag', 'spec', 'prompt', 'family', 'question', 'answer',
               'rationale', 'caption')


def open_split(world: examples_lib.WorldSpec, sizes: dict[str, int],
               data_dir: str, split: str):
  """The random-access source of one split of a built world dataset.

  Raises:
    FileNotFoundError: naming the directory, if the dataset is not built.
    ValueError: for an unknown split.
  """
  if split not in sizes:
    raise ValueError(f'unknown split {split!r}; the dataset has {list(sizes)}')
  builder = dataset_lib.ShapesWorld(
      config=dataset_lib.config_for(world, sizes), data_dir=data_dir,
      file_format='array_record')
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'no shapes-world dataset at {builder.data_dir}; run the world stage '
        '(python -m lvrpo_jax.main --config=... with stages including '
        "'world') with the same world settings first")
  return builder.as_data_source()[split]


class Decode(grain.transforms.Map):
  """Record -> fixed-shape numpy dict that batches by stacking.

  Text fields become `str`; the variable-length object lists are padded to
  objects.MAX_OBJECTS (colour/shape -1, box 0) with `num_objects` added.
  """

  def map(self, record: dict) -> dict:
    out = {k: v for k, v in record.items() if not k.startswith('object_')}
    for key in TEXT_FIELDS:
      value = out[key]
      out[key] = value.decode() if isinstance(value, bytes) else str(value)
    n = len(record['object_colors'])
    out['num_objects'] = np.int32(n)
    for key, fill, shape in (('object_colors', -1, ()),
                             ('object_shapes', -1, ()),
                             ('object_boxes', 0, (4,))):
      padded = np.full((objects.MAX_OBJECTS,) + shape, fill, np.int32)
      padded[:n] = record[key]
      out[key] = padded
    return out


def batches(source, *, batch_size: int, seed: int,
            shard_index: int | None = None, shard_count: int | None = None,
            shuffle: bool = True, num_epochs: int | None = None,
            transforms=(), worker_count: int = 0,
            drop_remainder: bool = True) -> grain.IterDataset:
  """A batched, sharded, optionally shuffled and repeated pipeline.

  Args:
    source: a random-access source (`open_split`), or any sequence.
    batch_size: per-process batch size.
    seed: shuffle seed (reseeded per epoch).
    shard_index, shard_count: this process's shard; default: JAX's process
      index and count.
    shuffle: permute each epoch.
    num_epochs: None repeats forever.
    transforms: grain transforms applied after `Decode`, per example (module
      level, so worker processes can pickle them).
    worker_count: >0 reads in that many worker processes.
    drop_remainder: drop a last partial batch (keeps shapes static).

  Returns:
    A grain.IterDataset; `iter()` gives a checkpointable iterator.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size} must be >= 1')
  if shard_index is None or shard_count is None:
    import jax  # Deferred: only the default shard needs JAX.
    shard_index, shard_count = jax.process_index(), jax.process_count()
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index={shard_index} must be in '
                     f'[0, {shard_count})')
  ds = grain.MapDataset.source(source)
  shard_size = len(range(shard_index, len(ds), shard_count))
  if shard_size < batch_size and drop_remainder:
    raise ValueError(f'shard {shard_index}/{shard_count} has {shard_size} '
                     f'examples, fewer than batch_size={batch_size}')
  if shuffle:
    ds = ds.shuffle(seed=seed)
  # Strided after repeating: the shards interleave one stream of epochs.
  ds = ds.repeat(num_epochs)[shard_index::shard_count].map(Decode())
  for transform in transforms:
    ds = ds.map(transform)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  # The reader prefetches 500 elements by default, and an element here is a
  # batch: prefetch about that many examples instead. (Batching after the
  # conversion would change which batches mp_prefetch's workers make.)
  examples = grain.ReadOptions().prefetch_buffer_size
  prefetch = max(1, -(-examples // batch_size))
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=min(grain.ReadOptions().num_threads, prefetch),
      prefetch_buffer_size=prefetch))
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():
      # Grain reads its absl flags (--grain_*) when the workers start; outside
      # `app.run` (a test, a notebook) nothing has parsed them: use defaults.
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(
        grain.multiprocessing.MultiprocessingOptions(num_workers=worker_count))
  return iter_ds
