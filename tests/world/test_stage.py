"""The world stages (lvrpo_jax/world/stage.py), run through the entry point."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lvrpo_jax.data import pipeline
from lvrpo_jax.world import dataset as dataset_lib
from lvrpo_jax.world import examples as examples_lib
from lvrpo_jax.world import questions as questions_lib
from lvrpo_jax.world import spec as spec_lib

_ROOT = pathlib.Path(__file__).parents[2]
_SIZES = {'train': 120, 'test': 24, 'heldout': 24, 'val': 12}
_PREVIEW = 12
_ARGS = ('--config=configs/base.py:world_preview',
         f'--config.world.num_train={_SIZES["train"]}',
         f'--config.world.num_test={_SIZES["test"]}',
         f'--config.world.num_heldout={_SIZES["heldout"]}',
         f'--config.world.num_val={_SIZES["val"]}',
         f'--config.world.preview_examples={_PREVIEW}')
# The world of configs/base.py, written out independently.
_HELDOUT_PAIRS = ('purple circle', 'orange square', 'cyan triangle')
_HELDOUT_RELATIONS = ('triangle above circle', 'circle left_of square')
_WORLD = examples_lib.WorldSpec(heldout=examples_lib.Compositions.parse(
    _HELDOUT_PAIRS, _HELDOUT_RELATIONS), train_relation_first=0.25)


def _run(workdir, *args):
  return subprocess.run(
      [sys.executable, '-m', 'lvrpo_jax.main', *_ARGS, f'--workdir={workdir}',
       *args], cwd=_ROOT, env=dict(os.environ), capture_output=True,
      text=True, timeout=300, check=False)


def _files(directory):
  """{path: (inode, mtime)} of every file under `directory`."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      stat = os.stat(os.path.join(root, name))
      out[os.path.join(root, name)] = (stat.st_ino, stat.st_mtime_ns)
  return out


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
  """(workdir, result) of one world_preview run, shared by this module."""
  workdir = tmp_path_factory.mktemp('world_preview')
  return workdir, _run(workdir)


@pytest.fixture(scope='module')
def stats(first_run):
  workdir, result = first_run
  assert result.returncode == 0, result.stderr
  return json.loads((workdir / 'world_stats.json').read_text())


def test_both_stages_run_and_report(first_run):
  workdir, result = first_run
  assert result.returncode == 0, result.stderr
  # Only the pipeline's own lines: TFDS's banner and bars go to stderr.
  lines = result.stdout.splitlines()
  assert len(lines) == 8, result.stdout
  assert lines[0] == ('[stage world] start: lvrpo_jax.world.stage:run_world, '
                      f'workdir {workdir}')
  assert lines[1].startswith(f'  building {sum(_SIZES.values())} examples '
                             'with ')
  assert lines[2].startswith(f'  world: {sum(_SIZES.values())} examples in ')
  assert lines[3].startswith('[stage world] done in ')
  assert lines[4] == ('[stage world_preview] start: '
                      'lvrpo_jax.world.stage:run_world_preview, '
                      f'workdir {workdir}')
  assert lines[5] == (f'  world_preview: {_PREVIEW} examples in '
                      f'{workdir / "world_preview.png"}')
  assert lines[6].startswith('[stage world_preview] done in ')
  assert lines[7].startswith('[summary] ran: world (')
  assert ', world_preview (' in lines[7]


def test_stats_count_every_example(stats):
  assert list(stats['splits']) == list(_SIZES)
  for split, n in _SIZES.items():
    split_stats = stats['splits'][split]
    assert split_stats['examples'] == n
    for key in ('per_tag', 'per_family', 'per_answer'):
      assert sum(split_stats[key].values()) == n, (split, key)
      assert all(count > 0 for count in split_stats[key].values())
    assert set(split_stats['per_tag']) <= set(spec_lib.TAGS)
    assert set(split_stats['per_family']) <= set(questions_lib.FAMILIES)
  heldout_tags = set(stats['splits']['heldout']['per_tag'])
  assert heldout_tags and heldout_tags <= set(examples_lib.HELDOUT_TAGS)
  # With 120 examples, the train split shows more than the held-out tags.
  assert set(stats['splits']['train']['per_tag']) - heldout_tags


def test_stats_describe_the_world(stats, first_run):
  workdir, _ = first_run
  name = dataset_lib.config_for(_WORLD, _SIZES).name
  assert stats['config_name'] == name
  assert stats['data_dir'] == str(
      workdir / 'world' / 'data' / 'shapes_world' / name
      / str(dataset_lib.ShapesWorld.VERSION))
  assert (stats['image_size'], stats['layout']) == (32, 'grid')
  assert stats['heldout_pairs'] == sorted(_HELDOUT_PAIRS)
  assert stats['heldout_relations'] == sorted([
      'triangle above circle', 'circle below triangle',
      'circle left of square', 'square right of circle'])


def test_dataset_equals_regenerated_examples(first_run):
  # The stage builds with worker processes (one per core, up to 8).
  workdir, result = first_run
  assert result.returncode == 0, result.stderr
  for split, n in _SIZES.items():
    source = pipeline.open_split(_WORLD, _SIZES,
                                 str(workdir / 'world' / 'data'), split)
    assert sorted(source[i]['index'] for i in range(n)) == list(range(n))
    for position in (0, n - 1):
      record = source[position]
      expected = dataset_lib.record(
          examples_lib.make_example(_WORLD, split, record['index']))
      np.testing.assert_array_equal(record['image'], expected['image'])
      for key in ('prompt', 'question', 'answer', 'spec'):
        assert record[key].decode() == expected[key], (split, key)


def test_preview_shows_the_first_examples_of_each_split(first_run):
  workdir, result = first_run
  assert result.returncode == 0, result.stderr
  data_dir = str(workdir / 'world' / 'data')
  per_split = -(-_PREVIEW // len(_SIZES))
  records = [pipeline.open_split(_WORLD, _SIZES, data_dir, split)[i]
             for split in _SIZES for i in range(per_split)]
  with Image.open(workdir / 'world_preview.png') as image:
    assert image.mode == 'RGB'
    grid = np.asarray(image)
  columns, rows = 6, 2
  assert grid.shape[0] % rows == 0 and grid.shape[1] % columns == 0
  tile_height, tile_width = grid.shape[0] // rows, grid.shape[1] // columns
  scaled = 4 * 32  # Each 32x32 image, upscaled 4 times, over its caption.
  assert tile_height > scaled and tile_width >= scaled
  for i in (0, 7, _PREVIEW - 1):
    top = (i // columns) * tile_height
    left = (i % columns) * tile_width + (tile_width - scaled) // 2
    expected = np.repeat(np.repeat(records[i]['image'], 4, 0), 4, 1)
    np.testing.assert_array_equal(
        grid[top:top + scaled, left:left + scaled], expected, err_msg=str(i))
    caption = grid[top + scaled:top + tile_height,
                   (i % columns) * tile_width:(i % columns + 1) * tile_width]
    assert (caption != 255).any()  # Some text is drawn under each image.


def test_a_second_run_reuses_the_dataset(first_run):
  workdir, result = first_run
  assert result.returncode == 0, result.stderr
  stats_before = (workdir / 'world_stats.json').read_text()
  files_before = _files(workdir / 'world' / 'data')
  assert files_before
  again = _run(workdir)
  assert again.returncode == 0, again.stderr
  assert _files(workdir / 'world' / 'data') == files_before
  assert (workdir / 'world_stats.json').read_text() == stats_before
  assert again.stdout.splitlines()[-1].startswith('[summary] ran: world (')


def test_unsupported_image_size_is_a_config_error(tmp_path):
  result = _run(tmp_path, '--config.world.image_size=48')
  assert result.returncode == 2
  assert result.stderr.count('\n') == 1, result.stderr
  assert result.stderr.startswith('config error: world.image_size: ')
  assert not result.stdout
  assert not list(tmp_path.iterdir())
