"""Evaluation intervals, the results tables and ROC AUC, by hand; the VQA
scorer on a micro model."""

import math
import types

import numpy as np
import pytest
from flax import nnx

from lvrpo_jax.models import presets
from lvrpo_jax.models import unified
from lvrpo_jax.train import eval_stats
from lvrpo_jax.train import evaluate
from lvrpo_jax.world import detect
from lvrpo_jax.world import scene as scene_lib
from lvrpo_jax.world import spec as spec_lib
from lvrpo_jax.world import tokenizer as tok


def test_wilson_interval_by_hand():
  # 8 of 10: centre (0.8 + z^2/20) / (1 + z^2/10), the textbook case
  # [0.4902, 0.9433].
  low, high = eval_stats.wilson(8, 10)
  assert low == pytest.approx(0.4902, abs=1e-4)
  assert high == pytest.approx(0.9433, abs=1e-4)
  low, high = eval_stats.wilson(0, 10)
  assert low == 0.0 and high > 0.2


def test_mean_of_proportions_interval_by_hand():
  per_tag, counts = {'a': 0.0, 'b': 1.0}, {'a': 16, 'b': 16}
  low, high = eval_stats.mean_of_proportions_ci(per_tag, counts)
  # Agresti-Coull: 2/20 and 18/20, variance each 0.1 * 0.9 / 20 = 0.0045;
  # of the mean (0.0045 + 0.0045) / 4; half width z * sqrt(0.00225).
  half = 1.959963984540054 * math.sqrt(0.00225)
  assert low == pytest.approx(0.5 - half) and high == pytest.approx(0.5 + half)


def _paired(only_a, only_b, both, neither):
  """0/1 outcomes of two models with the given 2 x 2 table."""
  a = [1] * only_a + [0] * only_b + [1] * both + [0] * neither
  b = [0] * only_a + [1] * only_b + [1] * both + [0] * neither
  return a, b


def test_paired_difference_by_hand():
  # 3 items only a gets right, 1 only b, 4 both, 2 neither: the difference
  # is 7/10 - 5/10. Agresti-Min: cells + 0.5, so 3.5 and 1.5 of 12; centre
  # 2/12; variance (5 - 2^2/12) / 12^2 = 0.032407, sd 0.180021.
  delta, (low, high) = eval_stats.paired_difference(*_paired(3, 1, 4, 2))
  assert delta == pytest.approx(0.2)
  assert low == pytest.approx(2 / 12 - 1.959963984540054 * 0.180021, abs=1e-6)
  assert high == pytest.approx(2 / 12 + 1.959963984540054 * 0.180021,
                               abs=1e-6)


def test_paired_difference_is_agresti_min():
  # The published form: p12 = (n12 + 0.5) / (n + 2), p21 likewise;
  # var = (p12 + p21 - (p12 - p21)^2) / (n + 2).
  for cells in ((40, 12, 900, 48), (0, 0, 50, 50), (7, 30, 3, 0)):
    n = sum(cells)
    p12, p21 = (cells[0] + 0.5) / (n + 2), (cells[1] + 0.5) / (n + 2)
    half = 1.959963984540054 * math.sqrt(
        (p12 + p21 - (p12 - p21) ** 2) / (n + 2))
    delta, (low, high) = eval_stats.paired_difference(*_paired(*cells))
    assert delta == pytest.approx((cells[0] - cells[1]) / n)
    assert low == pytest.approx(max(-1, p12 - p21 - half))
    assert high == pytest.approx(min(1, p12 - p21 + half))
  # Two models that agree on every item still get an interval around 0.
  _, (low, high) = eval_stats.paired_difference(*_paired(0, 0, 50, 50))
  assert low < 0 < high


def test_paired_difference_of_tag_means_by_hand():
  # Tag 'x': a 3-1 (of 10) as above; tag 'y': a and b agree on 4 items.
  ax, bx = _paired(3, 1, 4, 2)
  ay, by = _paired(0, 0, 2, 2)
  tags = ['x'] * 10 + ['y'] * 4
  delta, (low, high) = eval_stats.paired_difference(ax + ay, bx + by, tags)
  assert delta == pytest.approx((0.2 + 0.0) / 2)
  var_x = (5 - 4 / 12) / 144
  var_y = 1 / 36  # Cells 0.5 and 0.5 of 6: (1 - 0) / 6^2.
  centre = (2 / 12 + 0) / 2
  half = 1.959963984540054 * math.sqrt((var_x + var_y) / 4)
  assert (low, high) == pytest.approx((centre - half, centre + half))
  with pytest.raises(ValueError, match='3 tags for 14'):
    eval_stats.paired_difference(ax + ay, bx + by, tags[:3])
  with pytest.raises(ValueError, match='equal, non-empty'):
    eval_stats.paired_difference([1, 0], [1])


def test_paired_interval_covers_the_true_difference():
  # Correlated paired outcomes: a is right where u < 0.8, b where u < 0.7
  # and on a fifth of the items with u >= 0.8, so P(a) - P(b) = 0.8 -
  # (0.7 + 0.2 * 0.2) = 0.06. The 95 % interval covers it in about 95 % of
  # 2,000 evaluations of 300 items (Monte Carlo error 0.005).
  rng = np.random.default_rng(0)
  covered = 0
  for _ in range(2000):
    u = rng.random(300)
    a = u < 0.8
    b = (u < 0.7) | ((u >= 0.8) & (rng.random(300) < 0.2))
    _, (low, high) = eval_stats.paired_difference(a, b)
    covered += low <= 0.06 <= high
  assert 0.93 <= covered / 2000 <= 0.97


def test_differences_of_every_pair():
  ax, bx = _paired(3, 1, 4, 2)
  outcomes = {
      'baseline': {'test': {'tags': ['x'] * 10, 'geneval': bx, 'vqa': bx}},
      'sft_continue': {'test': {'tags': ['x'] * 10, 'geneval': bx,
                                'vqa': ax}},
      'lvrpo': {'test': {'tags': ['x'] * 10, 'geneval': ax, 'vqa': bx}}}
  deltas = eval_stats.differences(outcomes)
  assert list(deltas) == ['sft_continue - baseline', 'lvrpo - baseline',
                          'lvrpo - sft_continue']
  d = deltas['lvrpo - baseline']['test']
  assert d['geneval_delta'] == pytest.approx(0.2)
  assert d['geneval_delta_ci'] == pytest.approx(
      eval_stats.paired_difference(ax, bx)[1])
  assert d['vqa_delta'] == 0.0
  assert deltas['lvrpo - sft_continue']['test']['vqa_delta'] == (
      pytest.approx(-0.2))
  assert evaluate.difference_table(
      {'lvrpo - baseline': deltas['lvrpo - baseline']}).splitlines()[2:] == [
          '| models | split | GenEval overall | VQA |', '|---|---|---|---|',
          '| lvrpo - baseline | test | +0.200 [-0.186, +0.520] | '
          '+0.000 [-0.163, +0.163] |']
  outcomes['lvrpo']['test']['tags'] = ['y'] * 10
  with pytest.raises(ValueError, match='lvrpo test: prompt tags differ'):
    eval_stats.differences(outcomes)


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


def test_failure_table_sums_over_tags():
  tally = lambda *counts: dict(zip(
      ('prompts', 'failed', 'missing', 'extra', 'relation', 'unclassified',
       'more_objects'), counts, strict=True))
  failures = {'lvrpo': {
      'test': {'counting': tally(10, 6, 2, 3, 0, 4, 5),
               'position': tally(8, 7, 3, 0, 5, 1, 2)},
      'heldout': {'colors': tally(5, 1, 1, 0, 0, 0, 0)}}}
  lines = evaluate.failure_table(failures).splitlines()
  assert lines[2:] == [
      '| model | split | prompts | failed | missing | extra | relation | '
      'unclassified | more_objects |', '|---|---|---|---|---|---|---|---|---|',
      '| lvrpo | test | 18 | 13 | 5 | 3 | 5 | 5 | 7 |',
      '| lvrpo | heldout | 5 | 1 | 1 | 0 | 0 | 0 | 0 |']


def test_tally_image_counts_failures_and_objects_beyond_the_prompt():
  def image(*placed):  # (colour, shape, grid cell) objects, rendered.
    return scene_lib.render(scene_lib.make_scene(
        32, 'grid', [(c, s) for c, s, _ in placed],
        [scene_lib.grid_origin(32, cell) for _, _, cell in placed]))

  one = spec_lib.colors('red', 'circle')
  two = spec_lib.counting('circle', 2)
  tallies = {}
  passed = [
      evaluate.tally_image(
          tallies.setdefault(spec.tag, dict.fromkeys(
              evaluate.FAILURE_COLUMNS, 0)), spec, detect(image(*placed)))
      for spec, placed in [
          (one, [('red', 'circle', 0)]),
          # Passes GenEval's `colors` rule, with an object it does not name.
          (one, [('red', 'circle', 0), ('blue', 'square', 5)]),
          (one, [('blue', 'circle', 0)]),
          (two, [('red', 'circle', 0), ('red', 'circle', 2),
                 ('blue', 'circle', 9)]),
      ]]
  assert passed == [True, True, False, False]
  assert tallies == {
      'colors': dict(prompts=3, failed=1, missing=1, extra=0, relation=0,
                     unclassified=0, more_objects=1),
      'counting': dict(prompts=1, failed=1, missing=0, extra=1, relation=0,
                       unclassified=0, more_objects=1)}


def _render(*placed):  # (colour, shape, grid cell) objects.
  return scene_lib.render(scene_lib.make_scene(
      32, 'grid', [(c, s) for c, s, _ in placed],
      [scene_lib.grid_origin(32, cell) for _, _, cell in placed]))


def test_turned_round_and_layout_by_hand():
  spec = spec_lib.position('triangle', 'left of', 'square')
  assert evaluate.turned_round(
      'a photo of a triangle left of a square',
      spec) == 'a photo of a triangle right of a square'
  below = spec_lib.position('square', 'below', 'circle')
  assert evaluate.turned_round('a square below a circle', below) == (
      'a square above a circle')
  # No relation, or one picture shows both ways round.
  assert evaluate.turned_round('a photo of a red circle',
                               spec_lib.colors('red', 'circle')) is None
  assert evaluate.turned_round(
      'a circle below a circle',
      spec_lib.position('circle', 'below', 'circle')) is None
  with pytest.raises(ValueError, match='not named once'):
    evaluate.turned_round('a photo of a triangle', spec)
  # Cells 0 and 1 are side by side in the top row of the 4 x 4 grid.
  a = detect(_render(('red', 'triangle', 0), ('blue', 'square', 1)))
  b = detect(_render(('blue', 'square', 1), ('red', 'triangle', 0)))
  c = detect(_render(('red', 'triangle', 1), ('blue', 'square', 0)))
  assert evaluate.layout(a) == evaluate.layout(b) != evaluate.layout(c)


def test_relation_blind_counts_pairs_drawn_alike():
  records = [
      {'prompt': spec_lib.prompt(spec).encode(), 'spec': spec.to_json()
       .encode()} for spec in [
           spec_lib.position('triangle', 'left of', 'square'),
           spec_lib.counting('circle', 2),
           spec_lib.position('square', 'left of', 'square'),
           spec_lib.position('triangle', 'right of', 'square'),
           spec_lib.position('triangle', 'above', 'square')]]
  keys = []

  def obeys(texts, key):  # Draws the relation asked for ('above': cells
    keys.append(key)      # 0 over 4).
    cells = {'left of': (0, 1), 'right of': (1, 0), 'above': (0, 4),
             'below': (4, 0)}
    return np.stack([_render(('red', 'triangle', cells[rel][0]),
                             ('blue', 'square', cells[rel][1]))
                     for t in texts for rel in spec_lib.CONVERSE
                     if f' {rel} ' in t])

  def ignores(texts, key):
    del key
    return np.stack([_render(('red', 'triangle', 0), ('blue', 'square', 1))
                     for _ in texts])

  assert evaluate.relation_blind(obeys, records, 2) == {
      'prompts': 3, 'same_layout': 0}
  # Each batch of pairs: the prompts and their twins from one noise key.
  assert keys == [0, 0, 2, 2]
  assert evaluate.relation_blind(ignores, records, 2) == {
      'prompts': 3, 'same_layout': 3}


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


def test_roc_auc_by_hand():
  # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 0.35 beats one,
  # 0.8 both, so 3 of 4 pairs.
  assert eval_stats.roc_auc([0.1, 0.4, 0.35, 0.8],
                          [False, False, True, True]) == 0.75
  assert eval_stats.roc_auc([1.0, 1.0], [True, False]) == 0.5  # A tie: half.
  assert eval_stats.roc_auc([0.0, 1.0], [True, False]) == 0.0
  assert eval_stats.roc_auc([0.2, 0.3], [True, True]) is None


def test_roc_auc_is_the_rank_sum_statistic():
  # Mann-Whitney: (sum of the positives' mid-ranks - n_pos (n_pos + 1) / 2)
  # / (n_pos n_neg), with tied scores sharing their mean rank.
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 12, 200).astype(float)  # Many ties.
  positive = rng.random(200) < 0.3 + 0.04 * scores
  order = np.argsort(scores, kind='stable')
  ranks = np.empty(200)
  ranks[order] = np.arange(1, 201)
  for value in np.unique(scores):
    ranks[scores == value] = ranks[scores == value].mean()
  n_pos, n_neg = positive.sum(), (~positive).sum()
  u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
  assert eval_stats.roc_auc(scores, positive) == pytest.approx(
      u / (n_pos * n_neg))


def test_model_split_table_marks_missing_values():
  lines = evaluate.model_split_table('AUC', {
      'baseline': {'test': {'exists': 1.0, 'relation': 0.5625},
                   'heldout': {'exists': None}}}).splitlines()
  assert lines == ['AUC:', '', '| model | split | exists | relation |',
                   '|---|---|---|---|', '| baseline | test | 1.000 | 0.562 |',
                   '| baseline | heldout | - | - |']


def test_answer_steps_by_hand():
  e, p = tok.EOS, tok.PAD
  tokens = np.array([[9, e, p, p, p, p],      # a bare answer: step 0
                     [4, 5, 4, 6, 9, e],      # after a rationale: step 4
                     [4, 5, 4, 6, 9, 8],      # no <eos>: the last step
                     [e, p, p, p, p, p]])     # empty: step 0
  np.testing.assert_array_equal(evaluate.answer_steps(tokens), [0, 4, 5, 0])


def test_vqa_scores_auc_of_the_yes_no_families():
  model = unified.UnifiedModel(presets.micro(), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  qa = [('relation', 'is the red circle above the blue square ?', 'yes'),
        ('relation', 'is the red circle above the blue square ?', 'no'),
        ('relation', 'is the red circle left of the blue square ?', 'no'),
        ('exists', 'is there a red circle ?', 'yes'),
        ('count', 'how many circles are there ?', 'two')]
  records = [{'image': rng.integers(0, 256, (32, 32, 3), np.uint8),
              'family': f.encode(), 'question': q.encode(),
              'answer': a.encode()} for f, q, a in qa]
  vqa = evaluate.vqa_scores(model, records, types.SimpleNamespace(
      batch_size=2))
  assert len(vqa['correct']) == 5
  # Families with both answers get an AUC; 'exists' has no 'no' question
  # and 'count' no yes/no answer.
  assert set(vqa['yes_no_auc']) == {'relation', 'exists'}
  assert vqa['yes_no_auc']['exists'] is None
  # One 'yes' against two 'no's: 0, 1/2 or 1 pair won, ties counting half.
  assert vqa['yes_no_auc']['relation'] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_each_split_scores_its_own_number_of_prompts():
  cfg = types.SimpleNamespace(num_examples=2000, heldout_examples=500)
  assert evaluate.prompts_of(cfg, 'test') == 2000
  # LVRPO trains on the held-out records after these.
  assert evaluate.prompts_of(cfg, 'heldout') == 500
  assert evaluate.prompts_of(cfg, 'val') == 2000
  assert set(evaluate.SPLITS) == {'test', 'heldout', 'val'}
  # Val's generation noise is its own; test and heldout keep theirs.
  assert evaluate.NOISE_STREAM == {'test': 0, 'heldout': 0, 'val': 1}
