"""The groups of an LVRPO step: which of them the update trains on (dynamic
sampling), and what is logged about them per question family (answers) or
GenEval tag (images).

Shapes: N samples in N / G consecutive groups of G (one prompt each); a
family is `lvrpo_prompts.family_id`'s int (NO_FAMILY: none named), a tag
the index in spec_lib.TAGS of a generation prompt's GenEval tag.
"""

import numpy as np

from lvrpo_jax.train import lvrpo_prompts
from lvrpo_jax.world import questions
from lvrpo_jax.world import spec as spec_lib


def family_labels(families) -> list[str | None]:
  """The names of the question families in the int array `families`
  (`lvrpo_prompts.family_id`; NO_FAMILY: None), for `label_shares` and
  `label_means`."""
  return [None if f == lvrpo_prompts.NO_FAMILY else questions.FAMILIES[f]
          for f in np.asarray(families)]


def tag_labels(tags) -> list[str]:
  """The GenEval tags named by the int array `tags` (indices in
  spec_lib.TAGS, `GenerationPrompts`' 'tag' field)."""
  return [spec_lib.TAGS[t] for t in np.asarray(tags)]


def label_means(components: dict, labels_n, prefix: str) -> dict[str, float]:
  """Each reward component's mean over the samples of each label present
  (a question family, a GenEval tag; None: none):
  {'<prefix>/<label>/<component>': mean}.

  Args:
    components: {name: [N]} rewards of N samples.
    labels_n: [N] their labels (`family_labels`, `tag_labels`).
    prefix: the metrics' prefix ('und/family', 'gen/tag').
  """
  labels = np.asarray(labels_n, object)
  out = {}
  for name in _names(labels):
    mask = labels == name
    for k, v in components.items():
      out[f'{prefix}/{name}/{k}'] = float(np.mean(np.asarray(v)[mask]))
  return out


def label_shares(labels_b, kept, prefix: str) -> dict[str, float]:
  """Of B sampled groups with a label each (a question family, a GenEval
  tag; None: none), which labels dynamic sampling keeps:
  {'<prefix>/<label>/sampled': share of the B groups, '<prefix>/<label>/
  kept': share of the kept ones} for each label sampled.
  """
  labels_b = np.asarray(labels_b, object)
  kept = np.asarray(kept)
  out = {}
  for label in _names(labels_b):
    mask = labels_b == label
    out[f'{prefix}/{label}/sampled'] = float(mask.mean())
    out[f'{prefix}/{label}/kept'] = float(mask[kept].mean())
  return out


def _names(labels) -> list[str]:
  """The distinct labels present (None left out), sorted."""
  return sorted({x for x in labels if x is not None})


def informative_groups(advantages_n, group_size: int, keep: int, ids=None):
  """Indices (ascending) of the `keep` groups with the largest sum of
  |advantage|; ties, e.g. among degenerate groups (all zero), go to the
  smaller prompt id (default: the earlier group).

  Args:
    advantages_n: [N] advantages of N / G consecutive groups of G.
    group_size: G.
    keep: groups to keep, at most N / G.
    ids: [N / G] the groups' prompt ids, or None.
  """
  score = np.abs(np.asarray(advantages_n)).reshape(-1, group_size).sum(1)
  if keep > score.size:
    raise ValueError(f'cannot keep {keep} of {score.size} groups')
  ids = np.arange(score.size) if ids is None else np.asarray(ids)
  return np.sort(np.lexsort((ids, -score))[:keep])
