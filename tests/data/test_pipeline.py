"""The shapes-world TFDS dataset and its Grain pipeline (lvrpo_jax.data)."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from lvrpo_jax.data import pipeline
from lvrpo_jax.world import dataset as dataset_lib
from lvrpo_jax.world import examples as examples_lib
from lvrpo_jax.world import objects

_SIZES = {'train': 256, 'test': 48, 'heldout': 48, 'val': 16}
_HELDOUT_PAIRS = ('purple circle', 'orange square', 'cyan triangle')
_HELDOUT_RELATIONS = ('triangle above circle', 'circle left_of square')
_WORLD = examples_lib.WorldSpec(heldout=examples_lib.Compositions.parse(
    _HELDOUT_PAIRS, _HELDOUT_RELATIONS))
_ROOT = pathlib.Path(__file__).parents[2]
_FIELDS = ('index', 'image', 'num_objects', 'object_colors', 'object_shapes',
           'object_boxes') + pipeline.TEXT_FIELDS


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A small dataset of `_WORLD`, built once for this module."""
  path = str(tmp_path_factory.mktemp('world_data'))
  dataset_lib.build(_WORLD, _SIZES, path, processes=1)
  return path


def _source(data_dir, split='train'):
  return pipeline.open_split(_WORLD, _SIZES, data_dir, split)


def _batches(data_dir, split='train', **kwargs):
  kwargs = {'batch_size': 16, 'seed': 0, 'shard_index': 0, 'shard_count': 1,
            **kwargs}
  return pipeline.batches(_source(data_dir, split), **kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(actual, expected):
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    assert actual[key].dtype == value.dtype, key
    np.testing.assert_array_equal(actual[key], value, err_msg=key)


def _indices(batches):
  return [int(i) for batch in batches for i in batch['index']]


def _files(directory):
  """{path: (inode, mtime)} of every file under `directory`."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      stat = os.stat(os.path.join(root, name))
      out[os.path.join(root, name)] = (stat.st_ino, stat.st_mtime_ns)
  return out


# A transform for the `transforms` argument; module level, so that Grain's
# worker processes can unpickle it.
class _ImageSum(grain.transforms.Map):

  def map(self, element):
    return {**element, 'image_sum': element['image'].astype(np.int64).sum()}


class _Count(grain.transforms.Map):
  """Counts the examples it sees (from any reader thread)."""

  def __init__(self):
    self.seen = []

  def map(self, element):
    self.seen.append(1)  # Atomic under the GIL.
    return element


@pytest.mark.parametrize('split', examples_lib.SPLITS)
def test_stored_records_equal_regenerated_examples(data_dir, split):
  source = _source(data_dir, split)
  assert len(source) == _SIZES[split]
  # Every index is stored once (in TFDS's shuffled order).
  stored = [source[i]['index'] for i in range(len(source))]
  assert sorted(stored) == list(range(_SIZES[split]))
  for position in (0, 1, len(source) // 2, len(source) - 1):
    record = source[position]
    expected = dataset_lib.record(
        examples_lib.make_example(_WORLD, split, record['index']))
    assert sorted(record) == sorted(expected)
    for key, value in expected.items():
      if isinstance(value, np.ndarray):
        assert record[key].dtype == value.dtype, key
        np.testing.assert_array_equal(record[key], value, err_msg=key)
      elif isinstance(value, str):
        assert record[key].decode() == value, key
      else:
        assert record[key] == value, key
    if split == 'heldout':
      assert expected['tag'] in examples_lib.HELDOUT_TAGS


def test_building_the_same_world_again_reuses_its_directory(data_dir):
  before = _files(data_dir)
  # Default processes: a rebuild would also spawn workers; the name must not
  # depend on them.
  builder = dataset_lib.build(_WORLD, _SIZES, data_dir)
  assert builder.builder_config.name == dataset_lib.config_for(
      _WORLD, _SIZES, processes=1).name
  assert _files(data_dir) == before
  assert before  # The snapshot saw the dataset's files.
  assert builder.data_dir.startswith(data_dir)
  assert len(builder.as_data_source()['train']) == _SIZES['train']


def test_config_name_identifies_the_content():
  name = dataset_lib.config_for(_WORLD, _SIZES).name
  assert name.startswith('grid32_')
  # The same content, described in another order, has the same name.
  reordered = examples_lib.WorldSpec(heldout=examples_lib.Compositions.parse(
      _HELDOUT_PAIRS[::-1], _HELDOUT_RELATIONS[::-1]))
  assert dataset_lib.config_for(reordered, dict(reversed(_SIZES.items())),
                                processes=4).name == name
  others = [
      (dataclasses.replace(_WORLD, seed=1), _SIZES),
      (dataclasses.replace(_WORLD, layout='free'), _SIZES),
      (dataclasses.replace(_WORLD, max_objects=3), _SIZES),
      (dataclasses.replace(_WORLD, image_size=64), _SIZES),
      (dataclasses.replace(_WORLD, heldout=examples_lib.Compositions.parse(
          _HELDOUT_PAIRS[:2], _HELDOUT_RELATIONS)), _SIZES),
      (dataclasses.replace(_WORLD, heldout=examples_lib.Compositions.parse(
          _HELDOUT_PAIRS, _HELDOUT_RELATIONS[:1])), _SIZES),
      (_WORLD, {**_SIZES, 'test': 49}),
      (_WORLD, {'train': 256, 'test': 48}),
  ]
  names = [dataset_lib.config_for(w, s).name for w, s in others]
  assert len(set(names + [name])) == len(others) + 1


_PRINT_NAME = f'''
from lvrpo_jax.world import dataset, examples
world = examples.WorldSpec(heldout=examples.Compositions.parse(
    {_HELDOUT_PAIRS!r}, {_HELDOUT_RELATIONS!r}))
print(dataset.config_for(world, {_SIZES!r}).name)
'''


def test_config_name_is_the_same_in_every_process():
  # Sets of strings iterate in an order that changes with the hash seed.
  runs = [subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, '-c', _PRINT_NAME], cwd=_ROOT,
      env={**os.environ, 'PYTHONHASHSEED': str(seed)},
      stdout=subprocess.PIPE, text=True) for seed in (1, 2, 3)]
  names = [run.communicate(timeout=120)[0].strip() for run in runs]
  assert all(run.returncode == 0 for run in runs)
  assert names == [dataset_lib.config_for(_WORLD, _SIZES).name] * 3


def test_another_world_gets_its_own_directory(data_dir):
  other = dataclasses.replace(_WORLD, seed=1)
  # Not built yet: the seed-0 dataset in the same data_dir is not read.
  with pytest.raises(FileNotFoundError):
    pipeline.open_split(other, _SIZES, data_dir, 'train')
  before = _files(dataset_lib.ShapesWorld(
      config=dataset_lib.config_for(_WORLD, _SIZES), data_dir=data_dir,
      file_format='array_record').data_dir)
  builder = dataset_lib.build(other, _SIZES, data_dir, processes=1)
  assert builder.builder_config.name != dataset_lib.config_for(
      _WORLD, _SIZES).name
  assert not any(path.startswith(builder.data_dir) for path in before)
  record = pipeline.open_split(other, _SIZES, data_dir, 'test')[0]
  expected = dataset_lib.record(
      examples_lib.make_example(other, 'test', record['index']))
  np.testing.assert_array_equal(record['image'], expected['image'])
  assert record['prompt'].decode() == expected['prompt']
  # The first world's files are untouched.
  for path, stat in before.items():
    assert (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == stat, path


def test_batch_shapes_dtypes_and_padding(data_dir):
  source = _source(data_dir)
  batch = next(iter(_batches(data_dir, shuffle=False)))
  assert sorted(batch) == sorted(_FIELDS)
  assert batch['image'].shape == (16, 32, 32, 3)
  assert batch['image'].dtype == np.uint8
  assert batch['index'].shape == (16,)
  assert batch['index'].dtype == np.int64
  assert batch['num_objects'].shape == (16,)
  assert batch['num_objects'].dtype == np.int32
  for key in ('object_colors', 'object_shapes'):
    assert batch[key].shape == (16, objects.MAX_OBJECTS)
    assert batch[key].dtype == np.int32
  assert batch['object_boxes'].shape == (16, objects.MAX_OBJECTS, 4)
  assert batch['object_boxes'].dtype == np.int32
  for key in pipeline.TEXT_FIELDS:
    assert batch[key].shape == (16,)
    assert batch[key].dtype.kind == 'U', key
  # Without shuffling, row j is stored record j, padded.
  counts = set()
  for j in range(16):
    record = source[j]
    n = len(record['object_colors'])
    counts.add(n)
    assert batch['index'][j] == record['index']
    np.testing.assert_array_equal(batch['image'][j], record['image'])
    assert batch['num_objects'][j] == n
    for key in pipeline.TEXT_FIELDS:
      assert batch[key][j] == record[key].decode(), key
    for key, fill in (('object_colors', -1), ('object_shapes', -1),
                      ('object_boxes', 0)):
      np.testing.assert_array_equal(batch[key][j][:n], record[key])
      assert (batch[key][j][n:] == fill).all(), key
  assert len(counts) > 1  # The padding was exercised with several lengths.


@pytest.mark.parametrize('shard_count', [2, 3])
def test_shards_are_disjoint_and_cover_every_index_once(data_dir,
                                                        shard_count):
  shards = []
  for shard_index in range(shard_count):
    batches = list(_batches(data_dir, batch_size=20, shuffle=False,
                            num_epochs=1, drop_remainder=False,
                            shard_index=shard_index,
                            shard_count=shard_count))
    size = len(range(shard_index, _SIZES['train'], shard_count))
    assert [len(b['index']) for b in batches] == (
        [20] * (size // 20) + [size % 20])
    shards.append(_indices(batches))
  for i, shard in enumerate(shards):
    for other in shards[i + 1:]:
      assert not set(shard) & set(other)
  assert sorted(sum(shards, [])) == list(range(_SIZES['train']))


@pytest.mark.parametrize('shard_count', [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(data_dir,
                                                           shard_count):
  # 256 examples, global batch 32: 24 steps cross two epoch boundaries.
  global_batch, steps = 32, 24
  single = _take(iter(_batches(data_dir, batch_size=global_batch)), steps)
  shards = [_take(iter(_batches(data_dir, batch_size=global_batch //
                                shard_count, shard_index=i,
                                shard_count=shard_count)), steps)
            for i in range(shard_count)]
  for step, expected in enumerate(single):
    together = sorted(int(i) for shard in shards for i in shard[step]['index'])
    assert together == sorted(int(i) for i in expected['index']), step


def test_default_shard_is_the_jax_process(data_dir):
  import jax  # pylint: disable=import-outside-toplevel
  assert (jax.process_index(), jax.process_count()) == (0, 1)
  default = pipeline.batches(_source(data_dir), batch_size=16, seed=0)
  explicit = _batches(data_dir, shard_index=0, shard_count=1)
  for actual, expected in zip(_take(iter(default), 3),
                              _take(iter(explicit), 3)):
    _assert_batches_equal(actual, expected)


def test_shuffle_is_a_seeded_permutation_per_epoch(data_dir):
  n = _SIZES['train']
  storage = _indices(_batches(data_dir, shuffle=False, num_epochs=1))
  batches = list(_batches(data_dir, seed=7, num_epochs=2))
  assert len(batches) == 2 * n // 16  # Two epochs, then the end.
  order = _indices(batches)
  epoch0, epoch1 = order[:n], order[n:]
  assert sorted(epoch0) == sorted(epoch1) == list(range(n))
  assert epoch0 != storage
  assert epoch0 != epoch1
  # The order is a function of the seed only.
  again = _indices(list(_batches(data_dir, seed=7, num_epochs=2)))
  assert again == order
  other_seed = _indices(list(_batches(data_dir, seed=8, num_epochs=1)))
  assert sorted(other_seed) == list(range(n))
  assert other_seed != epoch0


@pytest.mark.parametrize('batch_size, k', [
    (16, 3),
    (16, 15),  # The next batch is the last of epoch 0.
    (16, 16),  # The next batch is the first of epoch 1.
    (24, 10),  # The next batch holds 16 of epoch 0 and 8 of epoch 1.
])
def test_iterator_state_resumes_at_the_next_batch(data_dir, batch_size, k):
  n = _SIZES['train']
  it = iter(_batches(data_dir, batch_size=batch_size, seed=3))
  first = next(it)
  _take(it, k - 1)
  state = it.get_state()
  expected = _take(it, 2)
  # Stored as JSON (as a checkpoint would), restored in a new pipeline.
  restored = json.loads(json.dumps(state))
  fresh = iter(_batches(data_dir, batch_size=batch_size, seed=3))
  fresh.set_state(restored)
  for actual, want in zip(_take(fresh, 2), expected):
    _assert_batches_equal(actual, want)
  # The restore moved the iterator: a new one would give another batch.
  assert not np.array_equal(expected[0]['index'], first['index'])
  if (k + 1) * batch_size > n > k * batch_size:
    # A batch across the epoch boundary: the tail of one permutation and the
    # head of the next.
    epoch0 = _indices(_take(iter(_batches(data_dir, batch_size=n, seed=3)),
                            2))
    assert _indices(expected[:1]) == epoch0[k * batch_size:
                                            (k + 1) * batch_size]


def test_read_ahead_is_bounded_in_examples(data_dir):
  # Grain's reader prefetches a buffer of elements in threads; the pipeline
  # must buffer examples, not whole batches (500 batches of 256x256 images
  # would be gigabytes).
  count = _Count()
  it = iter(_batches(data_dir, batch_size=64, transforms=[count]))
  next(it)
  limit = 64 + grain.ReadOptions().prefetch_buffer_size + 64
  seen, deadline = -1, time.monotonic() + 30
  while len(count.seen) != seen and time.monotonic() < deadline:
    seen = len(count.seen)
    assert seen <= limit
    time.sleep(0.3)
  assert len(count.seen) == seen  # The reader stopped: its buffer is full.
  assert len(count.seen) <= limit
  it.close()


def test_transforms_run_after_decode(data_dir):
  plain, transformed = (
      next(iter(_batches(data_dir, transforms=t))) for t in ((), [_ImageSum()]))
  np.testing.assert_array_equal(
      transformed['image_sum'],
      plain['image'].astype(np.int64).sum(axis=(1, 2, 3)))
  _assert_batches_equal({k: v for k, v in transformed.items()
                         if k != 'image_sum'}, plain)


def test_worker_processes_give_the_same_batches(data_dir):
  kwargs = {'batch_size': 16, 'seed': 5, 'transforms': [_ImageSum()]}
  expected = _take(iter(_batches(data_dir, **kwargs)), 5)
  it = iter(_batches(data_dir, worker_count=2, **kwargs))
  try:
    actual = _take(it, 5)
    json.dumps(it.get_state())
  finally:
    it.close()
  for a, e in zip(actual, expected):
    _assert_batches_equal(a, e)


def test_open_split_of_a_missing_dataset_names_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match='no shapes-world dataset') as e:
    pipeline.open_split(_WORLD, _SIZES, str(tmp_path), 'train')
  assert str(tmp_path) in str(e.value)


def test_open_split_rejects_an_unknown_split(data_dir):
  with pytest.raises(ValueError, match="'validation'"):
    pipeline.open_split(_WORLD, _SIZES, data_dir, 'validation')


def test_batch_size_must_fit_a_shard(data_dir):
  # 48 test examples in 2 shards of 24.
  batch = next(iter(_batches(data_dir, 'test', batch_size=24, shard_count=2)))
  assert batch['image'].shape[0] == 24
  with pytest.raises(ValueError, match='fewer than batch_size=25'):
    _batches(data_dir, 'test', batch_size=25, shard_count=2)
  with pytest.raises(ValueError, match='batch_size=0'):
    _batches(data_dir, 'test', batch_size=0)


@pytest.mark.parametrize('shard_index, shard_count', [(2, 2), (-1, 2),
                                                      (0, 0)])
def test_shard_index_out_of_range(data_dir, shard_index, shard_count):
  with pytest.raises(ValueError, match='shard_index'):
    _batches(data_dir, shard_index=shard_index, shard_count=shard_count)
