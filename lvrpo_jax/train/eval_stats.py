"""The eval's statistics: intervals of proportions and of GenEval's mean of
per-tag proportions, ROC AUC, and paired differences of two models scored
on the same items (`lvrpo_jax.train.evaluate` within a run,
`lvrpo_jax.compare` across runs).
"""

import math

import numpy as np

_Z = 1.959963984540054  # 97.5 % normal quantile.
# Every item's verdict, per model and split, as the eval writes it
# (evaluate.run_eval) and the comparison across runs reads it.
OUTCOMES_FILE = 'outcomes.json'


def wilson(successes: int, n: int) -> list[float]:
  """Wilson score 95 % interval of a binomial proportion."""
  if n == 0:
    return [0.0, 1.0]
  p = successes / n
  centre = (p + _Z**2 / (2 * n)) / (1 + _Z**2 / n)
  half = _Z * math.sqrt(p * (1 - p) / n + _Z**2 / (4 * n * n)) / (
      1 + _Z**2 / n)
  return [max(0.0, centre - half), min(1.0, centre + half)]


def roc_auc(scores, positive) -> float | None:
  """Area under the ROC curve of `scores` [N] for the labels `positive` [N]:
  the chance that a random positive outscores a random negative, ties
  counting half (Mann-Whitney U / (n_pos n_neg)); None without both."""
  scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
  pos, neg = scores[positive], scores[~positive]
  if not (pos.size and neg.size):
    return None
  wins = (pos[:, None] > neg[None]).sum() + 0.5 * (
      pos[:, None] == neg[None]).sum()
  return float(wins / (pos.size * neg.size))


def mean_of_proportions_ci(per_tag: dict, counts: dict) -> list[float]:
  """95 % interval of the unweighted mean of per-tag proportions.

  Normal approximation with each tag's variance from the Agresti-Coull
  estimate (x + 2) / (n + 4), so a tag at 0 % or 100 % still contributes
  uncertainty instead of a zero-width interval.
  """
  k = len(per_tag)
  mean = sum(per_tag.values()) / k
  var = 0.0
  for tag, p in per_tag.items():
    n = counts[tag]
    adjusted = (p * n + 2) / (n + 4)
    var += adjusted * (1 - adjusted) / (n + 4)
  var /= k**2
  half = _Z * math.sqrt(var)
  return [max(0.0, mean - half), min(1.0, mean + half)]


def _agresti_min(a, b) -> tuple[float, float, float]:
  """(mean of a - b, adjusted centre, adjusted variance) of paired 0/1
  outcomes: Agresti & Min (2005), 0.5 added to each cell of the 2 x 2
  table before the Wald variance of the difference."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  if a.shape != b.shape or a.ndim != 1 or not a.size:
    raise ValueError(f'paired outcomes need two equal, non-empty vectors; '
                     f'got shapes {a.shape} and {b.shape}')
  only_a = np.sum(a & ~b) + 0.5
  only_b = np.sum(~a & b) + 0.5
  m = a.size + 2
  centre = (only_a - only_b) / m
  var = ((only_a + only_b) - (only_a - only_b)**2 / m) / m**2
  return float(a.mean() - b.mean()), float(centre), float(var)


def _interval(centre: float, var: float) -> list[float]:
  half = _Z * math.sqrt(var)
  return [max(-1.0, centre - half), min(1.0, centre + half)]


def paired_difference(a, b, tags=None) -> tuple[float, list[float]]:
  """Score of model a minus model b, judged on the same items, and its
  95 % interval.

  Args:
    a, b: 0/1 outcomes [n] of the two models, item i the same prompt or
      question for both.
    tags: None for a proportion (VQA accuracy); else each item's tag [n],
      and the score is the unweighted mean over tags of per-tag accuracy
      (GenEval overall): the tags' Agresti-Min variances summed over k^2.

  Returns:
    (difference, [low, high]).
  """
  if tags is None:
    delta, centre, var = _agresti_min(a, b)
    return delta, _interval(centre, var)
  a, b, tags = np.asarray(a, bool), np.asarray(b, bool), np.asarray(tags)
  if tags.shape != a.shape:
    raise ValueError(f'{tags.shape[0]} tags for {a.shape[0]} outcomes')
  per_tag = [_agresti_min(a[tags == t], b[tags == t])
             for t in np.unique(tags)]
  k = len(per_tag)
  delta, centre, var = (sum(x) for x in zip(*per_tag))
  return delta / k, _interval(centre / k, var / k**2)


def differences(outcomes: dict) -> dict:
  """Each model minus each model before it (baseline, sft_continue, lvrpo
  order), paired item by item.

  Args:
    outcomes: {model: {split: {'tags': [n], 'geneval': [n] 0/1,
      'vqa': [m] 0/1}}}, the same items in the same order for every model.

  Returns:
    {'<model> - <earlier model>': {split: {'geneval_delta',
    'geneval_delta_ci', 'vqa_delta', 'vqa_delta_ci'}}}.
  """
  names = list(outcomes)
  out = {}
  for j, name in enumerate(names):
    for earlier in names[:j]:
      pair = out[f'{name} - {earlier}'] = {}
      for split, o in outcomes[name].items():
        ref = outcomes[earlier][split]
        if o['tags'] != ref['tags']:
          raise ValueError(
              f'{name} {split}: prompt tags differ from {earlier}\'s')
        g, g_ci = paired_difference(o['geneval'], ref['geneval'], o['tags'])
        v, v_ci = paired_difference(o['vqa'], ref['vqa'])
        pair[split] = {'geneval_delta': g, 'geneval_delta_ci': g_ci,
                       'vqa_delta': v, 'vqa_delta_ci': v_ci}
  return out


def cell(value: float, ci, signed: bool = False) -> str:
  """A table cell: '0.594 [0.578, 0.610]', or with `signed` (a difference)
  '+0.030 [+0.012, +0.047]'."""
  f = '+.3f' if signed else '.3f'
  return f'{value:{f}} [{ci[0]:{f}}, {ci[1]:{f}}]'
