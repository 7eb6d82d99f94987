"""The `eval` stage: GenEval-style generation and VQA scores of each model.

For every trained model (`baseline`, the `pretrain` checkpoint, and the
`sft_continue` and `lvrpo` checkpoints when the config's stages include
them) and for the `test` split and the held-out compositions:
  generation  the first `eval.num_examples` examples' prompts -> an image
              each (Euler ODE, the context prefilled once,
              `eval.guidance`), judged by the world's detector and
              GenEval's rules: per-tag accuracy and their mean
              (`geneval_overall`);
  VQA         the first `eval.vqa_examples` examples' images and questions
              -> greedy answers, exact match with the true answer, per
              question family, and per true answer within each family
              (recall: a family's accuracy can hide a model that gives
              one answer to every question of the family).
Intervals are 95 %: Wilson's for a proportion (VQA), and for the mean of
per-tag proportions a normal approximation with Agresti-Coull variances.
Writes `workdir/eval/results.json` (`{model: {split: {...}}}`),
`vqa_answers.json` (`{model: {split: {family: {answer: [right, asked]}}}}`),
`results.md` and image grids of the first generations.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvrpo_jax import configs
from lvrpo_jax import metrics as metrics_lib
from lvrpo_jax.data import pipeline
from lvrpo_jax.models import sampling
from lvrpo_jax.models import vae as vae_lib
from lvrpo_jax.train import autoencoder
from lvrpo_jax.train import pretrain
from lvrpo_jax.train import trained
from lvrpo_jax.world import detect
from lvrpo_jax.world import geneval_scores
from lvrpo_jax.world import spec as spec_lib
from lvrpo_jax.world import stage as world_stage
from lvrpo_jax.world import tokenizer as tok
from lvrpo_jax.world import verify

SPLITS = ('test', 'heldout')
# Model name in the results -> the stage that trains it.
MODELS = {'baseline': 'pretrain', 'sft_continue': 'sft_continue',
          'lvrpo': 'lvrpo'}
QUESTION_LEN = 14
ANSWER_TOKENS = 2  # One word and <eos>.
_Z = 1.959963984540054  # 97.5 % normal quantile.


def wilson(successes: int, n: int) -> list[float]:
  """Wilson score 95 % interval of a binomial proportion."""
  if n == 0:
    return [0.0, 1.0]
  p = successes / n
  centre = (p + _Z**2 / (2 * n)) / (1 + _Z**2 / n)
  half = _Z * math.sqrt(p * (1 - p) / n + _Z**2 / (4 * n * n)) / (
      1 + _Z**2 / n)
  return [max(0.0, centre - half), min(1.0, centre + half)]


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


def pad_left(ids, length):
  if len(ids) > length:
    raise ValueError(f'{len(ids)} tokens exceed {length}')
  return [tok.PAD] * (length - len(ids)) + ids


def generation_scores(model, ae, records, cfg, seed: int):
  """GenEval-style scores of `records`' prompts; also the first images."""
  tokenizer = tok.Tokenizer()
  graphdef, state = nnx.split(model)
  ae_graph, ae_state = nnx.split(ae)

  @jax.jit
  def generate(state, ae_state, prompts, rng):
    return sampling.generate_images(
        nnx.merge(graphdef, state), nnx.merge(ae_graph, ae_state), prompts,
        rng, cfg.sample_steps, cfg.guidance)

  tags, passed, images = [], [], []
  for start in range(0, len(records), cfg.batch_size):
    chunk = records[start:start + cfg.batch_size]
    prompts = np.array([pad_left(tokenizer.encode(r['prompt'].decode()),
                                  pretrain.PROMPT_LEN) for r in chunk],
                       np.int32)
    # Pad the last chunk to the batch size: one compiled shape.
    rows = len(chunk)
    prompts = np.concatenate([prompts, np.repeat(
        prompts[:1], cfg.batch_size - rows, 0)])
    out = np.asarray(generate(state, ae_state, prompts,
                              jax.random.fold_in(jax.random.key(seed),
                                                 start)))[:rows]
    for record, image in zip(chunk, out):
      spec = spec_lib.Spec.from_json(record['spec'].decode())
      tags.append(spec.tag)
      passed.append(verify(spec, detect(image)).passed)
    images.extend(out[:max(0, 16 - len(images))])
  scores = geneval_scores(tags, passed)
  return scores, np.stack(images)


def vqa_scores(model, records, cfg):
  """Greedy answers to `records`' questions: accuracy overall and per
  family, and 'per_answer' {family: {true answer: [right, asked]}}."""
  tokenizer = tok.Tokenizer()
  graphdef, state = nnx.split(model)

  @jax.jit
  def answer(state, pixels, questions):
    return sampling.greedy_answers(nnx.merge(graphdef, state), pixels,
                                   questions, ANSWER_TOKENS)

  per_answer = {}  # family -> true answer -> [right, asked]
  for start in range(0, len(records), cfg.batch_size):
    chunk = records[start:start + cfg.batch_size]
    rows = len(chunk)
    pixels = vae_lib.from_uint8(np.stack([r['image'] for r in chunk]))
    questions = np.array([pad_left(tokenizer.encode(
        r['question'].decode()), QUESTION_LEN) for r in chunk], np.int32)
    pad = cfg.batch_size - rows
    pixels = jnp.concatenate([pixels, jnp.repeat(pixels[:1], pad, 0)])
    questions = np.concatenate([questions, np.repeat(questions[:1], pad, 0)])
    tokens = np.asarray(answer(state, pixels, questions))[:rows]
    for record, ids in zip(chunk, tokens):
      family, truth = record['family'].decode(), record['answer'].decode()
      tally = per_answer.setdefault(family, {}).setdefault(truth, [0, 0])
      tally[0] += tokenizer.decode(ids) == truth
      tally[1] += 1
  # Per family: the sums of its answers' tallies.
  per_family = {f: [sum(t[i] for t in a.values()) for i in (0, 1)]
                for f, a in sorted(per_answer.items())}
  hits = sum(h for h, _ in per_family.values())
  n = sum(c for _, c in per_family.values())
  return {'vqa_accuracy': hits / n, 'vqa_ci': wilson(hits, n),
          'per_family': {f: h / c for f, (h, c) in per_family.items()},
          'per_answer': {f: dict(sorted(a.items()))
                         for f, a in sorted(per_answer.items())}}


def run_eval(config, workdir: str) -> None:
  """Scores every trained model on both splits; writes results."""
  cfg = config.eval
  world, sizes = world_stage.world_and_sizes(config)
  data_dir = configs.world_data_dir(config, workdir)
  ae = autoencoder.train_autoencoder(config, workdir, require_complete=True)
  models = {name: trained.model_of(stage, config, workdir)
            for name, stage in MODELS.items()
            if name == 'baseline' or stage in config.stages}
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  results, answers, grids = {}, {}, {}
  for name, model in models.items():
    results[name], answers[name] = {}, {}
    for split in SPLITS:
      source = pipeline.open_split(world, sizes, data_dir, split)
      records = [source[i] for i in range(
          min(max(cfg.num_examples, cfg.vqa_examples), len(source)))]
      scores, images = generation_scores(
          model, ae, records[:cfg.num_examples], cfg, config.seed)
      results[name][split] = {
          'geneval_overall': scores['overall'],
          'geneval_ci': mean_of_proportions_ci(scores['per_tag'],
                                               scores['counts']),
          'per_tag': scores['per_tag'],
          **vqa_scores(model, records[:cfg.vqa_examples], cfg)}
      # results.json keeps the training issue's schema; the per-answer
      # tallies go to their own file.
      answers[name][split] = results[name][split].pop('per_answer')
      grids[f'{name}_{split}'] = metrics_lib.image_grid(images, columns=8,
                                                        scale=2)
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(out_dir, 'vqa_answers.json'), 'w') as f:
    json.dump(answers, f, indent=2)
  table = markdown_table(results)
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(table + '\n' + breakdown_tables(results) + '\n'
            + answer_table(answers))
  with metrics_lib.MetricsWriter(out_dir) as writer:
    writer.write_images(0, grids)
  print(table, flush=True)


def breakdown_tables(results: dict) -> str:
  """Markdown: GenEval per tag and VQA per question family, a row per
  model and split ('-' where a split has no prompt of a tag)."""
  out = []
  for key, title in (('per_tag', 'GenEval per tag'),
                     ('per_family', 'VQA per question family')):
    columns = sorted({c for splits in results.values()
                      for r in splits.values() for c in r[key]})
    out += [f'{title}:', '',
            '| model | split | ' + ' | '.join(columns) + ' |',
            '|---|---|' + '---|' * len(columns)]
    for name, splits in results.items():
      for split, r in splits.items():
        cells = (f'{r[key][c]:.3f}' if c in r[key] else '-' for c in columns)
        out.append(f'| {name} | {split} | ' + ' | '.join(cells) + ' |')
    out.append('')
  return '\n'.join(out)


def answer_table(answers: dict) -> str:
  """Markdown: VQA recall per true answer, a row per (family, answer) and a
  column per (model, split); each cell 'recall (questions asked)'."""
  columns = [(name, split) for name, splits in answers.items()
             for split in splits]
  rows = sorted({(family, answer) for splits in answers.values()
                 for r in splits.values() for family, a in r.items()
                 for answer in a})
  out = ['VQA recall per true answer (questions with that answer answered '
         'right, of how many):', '',
         '| family | answer | ' + ' | '.join(f'{n} {s}' for n, s in columns)
         + ' |', '|---|---|' + '---|' * len(columns)]
  for family, answer in rows:
    cells = []
    for name, split in columns:
      right, asked = answers[name][split].get(family, {}).get(answer, (0, 0))
      cells.append(f'{right / asked:.3f} ({asked})' if asked else '-')
    out.append(f'| {family} | {answer} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(out) + '\n'


def markdown_table(results: dict) -> str:
  lines = ['| model | split | GenEval overall (95 % CI) | VQA (95 % CI) |',
           '|---|---|---|---|']
  for name, splits in results.items():
    for split, r in splits.items():
      g, v = r['geneval_ci'], r['vqa_ci']
      lines.append(
          f"| {name} | {split} | {r['geneval_overall']:.3f} "
          f"[{g[0]:.3f}, {g[1]:.3f}] | {r['vqa_accuracy']:.3f} "
          f"[{v[0]:.3f}, {v[1]:.3f}] |")
  return '\n'.join(lines) + '\n'
