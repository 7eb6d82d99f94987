"""Evaluation intervals and the results table, by hand."""

import math

import pytest

from lvrpo_jax.train import evaluate


def test_wilson_interval_by_hand():
  # 8 of 10: centre (0.8 + z^2/20) / (1 + z^2/10), the textbook case
  # [0.4902, 0.9433].
  low, high = evaluate.wilson(8, 10)
  assert low == pytest.approx(0.4902, abs=1e-4)
  assert high == pytest.approx(0.9433, abs=1e-4)
  assert evaluate.wilson(0, 10)[0] == 0.0 and evaluate.wilson(0, 10)[1] > 0.2


def test_mean_of_proportions_interval_by_hand():
  per_tag, counts = {'a': 0.0, 'b': 1.0}, {'a': 16, 'b': 16}
  low, high = evaluate.mean_of_proportions_ci(per_tag, counts)
  # Agresti-Coull: 2/20 and 18/20, variance each 0.1 * 0.9 / 20 = 0.0045;
  # of the mean (0.0045 + 0.0045) / 4; half width z * sqrt(0.00225).
  half = 1.959963984540054 * math.sqrt(0.00225)
  assert low == pytest.approx(0.5 - half) and high == pytest.approx(0.5 + half)


def test_breakdown_tables():
  tables = evaluate.breakdown_tables({'lvrpo': {
      'test': {'per_tag': {'single_object': 0.5, 'position': 0.25},
               'per_family': {'color': 1.0}},
      'heldout': {'per_tag': {'position': 0.125},
                  'per_family': {'color': 0.75}}}}).splitlines()
  assert tables[:6] == [
      'GenEval per tag:', '', '| model | split | position | single_object |',
      '|---|---|---|---|', '| lvrpo | test | 0.250 | 0.500 |',
      '| lvrpo | heldout | 0.125 | - |']
  assert tables[7:12] == [
      'VQA per question family:', '', '| model | split | color |',
      '|---|---|---|', '| lvrpo | test | 1.000 |']


def test_markdown_table():
  table = evaluate.markdown_table({'baseline': {'test': {
      'geneval_overall': 0.5, 'geneval_ci': [0.4, 0.6],
      'vqa_accuracy': 0.75, 'vqa_ci': [0.7, 0.8]}}})
  assert table.splitlines()[2] == (
      '| baseline | test | 0.500 [0.400, 0.600] | 0.750 [0.700, 0.800] |')


def test_answer_table():
  answers = {
      'baseline': {'test': {'count': {'one': [9, 10], 'two': [0, 4]}},
                   'heldout': {'count': {'one': [3, 4]},
                               'relation': {'yes': [5, 5]}}},
      'lvrpo': {'test': {'count': {'one': [10, 10], 'two': [1, 4]}}}}
  lines = evaluate.answer_table(answers).splitlines()
  assert lines[2:] == [
      '| family | answer | baseline test | baseline heldout | lvrpo test |',
      '|---|---|---|---|---|',
      '| count | one | 0.900 (10) | 0.750 (4) | 1.000 (10) |',
      '| count | two | 0.000 (4) | - | 0.250 (4) |',
      '| relation | yes | - | 1.000 (5) | - |']
