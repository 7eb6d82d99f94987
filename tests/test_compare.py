"""The comparison across runs (lvrpo_jax/compare.py), on hand-made outcomes,
and the eval's item identity it relies on."""

import json
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

from lvrpo_jax import compare
from lvrpo_jax.train import eval_stats
from lvrpo_jax.train import evaluate

_ROOT = pathlib.Path(__file__).parents[1]
_ITEMS = {'prompts': 'p0', 'questions': 'q0', 'seed': 0, 'stream': 1,
          'batch_size': 64, 'sample_steps': 20, 'guidance': 1.0}
_TAGS = ['single_object'] * 4 + ['counting'] * 4


def _run(path, models, items=_ITEMS, split='val'):
  (path / 'eval').mkdir(parents=True)
  (path / 'eval' / 'outcomes.json').write_text(json.dumps({
      'items': {split: items},
      'models': {name: {split: {'tags': _TAGS, 'geneval': g, 'vqa': v}}
                 for name, (g, v) in models.items()}}))
  return str(path)


@pytest.fixture
def runs(tmp_path):
  a = _run(tmp_path / 'a', {
      'baseline': ([1, 0, 0, 1, 0, 0, 0, 1], [1, 1, 0, 0]),
      'lvrpo': ([1, 1, 0, 1, 0, 1, 1, 1], [1, 1, 1, 0])})
  b = _run(tmp_path / 'b', {
      'lvrpo': ([1, 1, 1, 1, 1, 0, 1, 1], [1, 1, 1, 1])})
  return a, b


def test_rows_are_each_model_of_a_run_or_the_one_named(runs):
  a, b = runs
  labels = [label for label, _ in compare.load_rows([a, f'{b}:lvrpo'], 'val')]
  assert labels == [f'{a}:baseline', f'{a}:lvrpo', f'{b}:lvrpo']


def test_scores_and_paired_differences_by_hand(runs):
  a, b = runs
  first, second, third = compare.compare(
      compare.load_rows([f'{a}:baseline', f'{a}:lvrpo', b], 'val'))
  # Baseline: single_object 2/4, counting 1/4 -> overall 0.375; VQA 2/4.
  assert first['geneval_overall'] == pytest.approx(0.375)
  assert first['vqa_accuracy'] == 0.5
  assert 'geneval_delta' not in first
  # lvrpo of run a: 3/4 and 3/4 -> 0.75, +0.375 over the baseline; VQA +1/4.
  assert second['geneval_overall'] == pytest.approx(0.75)
  assert second['geneval_delta'] == pytest.approx(0.375)
  assert second['vqa_delta'] == pytest.approx(0.25)
  # Run b against run a's baseline: 4/4 and 3/4 -> 0.875, +0.5; VQA +0.5.
  assert third['geneval_delta'] == pytest.approx(0.5)
  assert third['vqa_delta'] == pytest.approx(0.5)
  # The intervals are the eval's own.
  assert third['geneval_delta_ci'] == eval_stats.paired_difference(
      [1, 1, 1, 1, 1, 0, 1, 1], [1, 0, 0, 1, 0, 0, 0, 1], _TAGS)[1]
  assert third['vqa_ci'] == eval_stats.wilson(4, 4)


def test_table_marks_the_first_row_and_intervals_excluding_zero(runs):
  a, b = runs
  text = compare.table(compare.compare(
      compare.load_rows([f'{a}:baseline', b], 'val')), 'val')
  first, second = text.splitlines()[-2:]
  # GenEval: Agresti-Coull (2 + 2) / 8 and (1 + 2) / 8, variance
  # (0.5 * 0.5 / 8 + 0.375 * 0.625 / 8) / 2^2 = 0.015137, half-width
  # 1.96 * 0.12303 = 0.2411 around 0.375. VQA: Wilson's 2 of 4, centre 0.5,
  # half-width 1.96 * sqrt(1/16 + 1.96^2/64) / (1 + 1.96^2/4) = 0.3500.
  assert first == f'| {a}:baseline | 0.375 [0.134, 0.616] | ' \
                  '0.500 [0.150, 0.850] |  |  |'
  assert second.startswith(f'| {b}:lvrpo | 0.875 ')
  g = eval_stats.paired_difference([1, 1, 1, 1, 1, 0, 1, 1],
                                   [1, 0, 0, 1, 0, 0, 0, 1], _TAGS)
  v = eval_stats.paired_difference([1, 1, 1, 1], [1, 1, 0, 0])
  cells = second.split(' | ')[-2:]
  for cell, (delta, (low, high)) in zip(cells, (g, v)):
    assert cell.startswith(f'{delta:+.3f} [{low:+.3f}, {high:+.3f}]')
    assert cell.rstrip(' |').endswith('*') == (low > 0 or high < 0)
  # Formatting alone: a star exactly where the interval excludes 0.
  row = {'model': 'x', 'geneval_overall': 0.5, 'geneval_ci': [0.4, 0.6],
         'vqa_accuracy': 0.5, 'vqa_ci': [0.4, 0.6]}
  text = compare.table([row, {**row, 'geneval_delta': 0.1,
                              'geneval_delta_ci': [0.02, 0.18],
                              'vqa_delta': -0.1,
                              'vqa_delta_ci': [-0.2, 0.01]}], 'val')
  assert text.splitlines()[-1].endswith(
      '| +0.100 [+0.020, +0.180]* | -0.100 [-0.200, +0.010] |')


@pytest.mark.parametrize('change, named', [
    ({'seed': 1}, 'seed'), ({'prompts': 'p1'}, 'prompts'),
    ({'batch_size': 32, 'guidance': 3.0}, 'batch_size, guidance')])
def test_runs_with_other_items_or_noise_do_not_pair(tmp_path, runs, change,
                                                    named):
  a, _ = runs
  other = _run(tmp_path / 'c', {'lvrpo': ([1] * 8, [1] * 4)},
               items={**_ITEMS, **change})
  with pytest.raises(ValueError, match=f'differ from .*\\({named}\\)'):
    compare.load_rows([a, other], 'val')


def test_missing_split_model_or_outcomes_are_named(tmp_path, runs):
  a, _ = runs
  with pytest.raises(ValueError, match="scored \\['val'\\], not 'test'"):
    compare.load_rows([a], 'test')
  with pytest.raises(ValueError, match="no model 'sft_continue'"):
    compare.load_rows([f'{a}:sft_continue'], 'val')
  with pytest.raises(FileNotFoundError, match='no outcomes.json'):
    compare.load_rows([str(tmp_path)], 'val')


def test_cli(tmp_path, runs):
  a, b = runs
  out = tmp_path / 'c.json'
  ok = subprocess.run(
      [sys.executable, '-m', 'lvrpo_jax.compare', '--split=val',
       f'--out={out}', a, b], cwd=_ROOT, capture_output=True, text=True,
      check=False)
  assert ok.returncode == 0, ok.stderr
  assert f'| {b}:lvrpo | 0.875 ' in ok.stdout
  saved = json.loads(out.read_text())
  assert [m['model'] for m in saved['models']] == [
      f'{a}:baseline', f'{a}:lvrpo', f'{b}:lvrpo']
  bad = subprocess.run(
      [sys.executable, '-m', 'lvrpo_jax.compare', a], cwd=_ROOT,
      capture_output=True, text=True, check=False)
  assert bad.returncode == 1
  assert "compare: " in bad.stderr and "not 'test'" in bad.stderr


def test_item_identity_changes_with_what_decides_the_items():
  cfg = types.SimpleNamespace(batch_size=64, sample_steps=20, guidance=1.0)
  image = np.zeros((2, 2, 3), np.uint8)
  records = [{'prompt': b'a photo of a circle', 'question': b'what ?',
              'image': image}] * 3
  same = evaluate.item_identity(records, records, cfg, 0, 0)
  assert same == evaluate.item_identity(list(records), records, cfg, 0, 0)
  other_prompt = [{**records[0], 'prompt': b'a photo of a square'}]
  other_image = [{**records[0], 'image': image + 1}]
  for changed in (evaluate.item_identity(other_prompt + records[1:], records,
                                         cfg, 0, 0),
                  evaluate.item_identity(records, other_image + records[1:],
                                         cfg, 0, 0),
                  evaluate.item_identity(records, records, cfg, 0, 1),
                  evaluate.item_identity(records, records, cfg, 1, 0)):
    assert changed != same
