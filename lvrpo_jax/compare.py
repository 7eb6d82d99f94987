r"""Models of different runs compared item by item: sweeps, seeds, settings.

  python -m lvrpo_jax.compare [--split=test] [--out=FILE.json] \
      RUN[:MODEL] RUN[:MODEL] ...

RUN is a work directory whose `eval` stage has run (or its `eval/`
directory); RUN alone stands for each model its eval scored (`baseline`,
`sft_continue`, `lvrpo`), RUN:MODEL for one. Prints a Markdown table with a
row per model: GenEval overall and VQA accuracy on `--split` with their 95 %
intervals, and each model minus the first row, paired item by item (the
eval's own statistics, `train/eval_stats.py`). Pairing needs the same items
and noise: every run's eval must have scored the split's same prompts and
questions with the same seed, noise stream, batch size, sampler steps and
guidance (`outcomes.json`'s 'items'); a run that did not is an error naming
what differs. Choose settings on `--split=val` (the world's `num_val`, the
eval's `eval.splits`) and report the chosen one on test.
"""

import json
import os
import sys

from absl import app
from absl import flags

from lvrpo_jax.train import eval_stats
from lvrpo_jax.world import geneval_scores


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so the
  module imports anywhere)."""
  flags.DEFINE_string('split', 'test', 'Split to compare on.')
  flags.DEFINE_string('out', None, 'Also write the comparison as JSON.')


def load_rows(specs, split: str) -> list[tuple[str, dict]]:
  """[(label, {'tags', 'geneval', 'vqa'})] of `specs` ('RUN' or
  'RUN:MODEL') on `split`, in order.

  Raises:
    FileNotFoundError: a run without `eval/outcomes.json`.
    ValueError: an unknown model or split, or a run whose items or noise
      differ from the first run's (the message names what differs).
  """
  rows, first_items = [], None
  for spec in specs:
    run, _, model = spec.partition(':')
    name = eval_stats.OUTCOMES_FILE
    path = os.path.join(run, name)
    if not os.path.exists(path):
      path = os.path.join(run, 'eval', name)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f'{run}: no {name} in it or in its eval/ directory; run the eval '
          'stage (evals before session 26 did not write it)')
    with open(path) as f:
      outcomes = json.load(f)
    items = outcomes['items'].get(split)
    if items is None:
      raise ValueError(f'{run}: its eval scored {sorted(outcomes["items"])}, '
                       f'not {split!r} (eval.splits)')
    if first_items is None:
      first_items = (spec, items)
    elif items != first_items[1]:
      differ = sorted(k for k in items.keys() | first_items[1].keys()
                      if items.get(k) != first_items[1].get(k))
      raise ValueError(
          f'{run}: its {split} items or noise differ from {first_items[0]}\'s '
          f'({", ".join(differ)}), so the two do not pair item by item')
    models = outcomes['models']
    if model and model not in models:
      raise ValueError(f'{run}: no model {model!r}; its eval scored '
                       f'{", ".join(models)}')
    for m in [model] if model else list(models):
      rows.append((f'{run}:{m}', models[m][split]))
  return rows


def compare(rows) -> list[dict]:
  """Each row's scores, and its paired difference from the first row."""
  ref = rows[0][1]
  out = []
  for label, o in rows:
    scores = geneval_scores(o['tags'], o['geneval'])
    row = {'model': label, 'geneval_overall': scores['overall'],
           'geneval_ci': eval_stats.mean_of_proportions_ci(
               scores['per_tag'], scores['counts']),
           'vqa_accuracy': sum(o['vqa']) / len(o['vqa']),
           'vqa_ci': eval_stats.wilson(sum(o['vqa']), len(o['vqa']))}
    if out:
      row['geneval_delta'], row['geneval_delta_ci'] = (
          eval_stats.paired_difference(o['geneval'], ref['geneval'],
                                       o['tags']))
      row['vqa_delta'], row['vqa_delta_ci'] = eval_stats.paired_difference(
          o['vqa'], ref['vqa'])
    out.append(row)
  return out


def table(compared: list[dict], split: str) -> str:
  """Markdown: a row per model; the differences from the first row, paired
  (* where the 95 % interval excludes 0)."""
  cell = eval_stats.cell

  def delta(v, ci):
    return cell(v, ci, signed=True) + ('*' if ci[0] > 0 or ci[1] < 0 else '')
  lines = [f'{split}: each model, and minus {compared[0]["model"]} paired '
           'over the same items (95 % intervals; * excludes 0)', '',
           '| model | GenEval overall | VQA | GenEval - first | VQA - first |',
           '|---|---|---|---|---|']
  for r in compared:
    diffs = (['', ''] if 'geneval_delta' not in r else
             [delta(r['geneval_delta'], r['geneval_delta_ci']),
              delta(r['vqa_delta'], r['vqa_delta_ci'])])
    lines.append(f"| {r['model']} | "
                 f"{cell(r['geneval_overall'], r['geneval_ci'])} | "
                 f"{cell(r['vqa_accuracy'], r['vqa_ci'])} | "
                 + ' | '.join(diffs) + ' |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('name at least one RUN[:MODEL]')
  args = flags.FLAGS
  try:
    compared = compare(load_rows(argv[1:], args.split))
  except (OSError, ValueError) as e:
    sys.stderr.write(f'compare: {e}\n')
    sys.exit(1)
  print(table(compared, args.split))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'split': args.split, 'models': compared}, f, indent=2)


if __name__ == '__main__':
  define_flags()
  app.run(main)
