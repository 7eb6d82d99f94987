"""The `eval` stage: GenEval-style generation and VQA scores of each model.

For every trained model (`baseline`, the `pretrain` checkpoint, and the
`sft_continue` and `lvrpo` checkpoints when the config's stages include
them) and for each split of `eval.splits` (by default the `test` split and
the held-out compositions; `val`, a second draw from test's distribution,
is for choosing settings):
  generation  the first `eval.num_examples` examples' prompts of the test
              (or val) split and `eval.heldout_examples` of the held-out
              compositions (LVRPO trains on the others' prompts) -> an image
              each (Euler ODE, the context prefilled once,
              `eval.guidance`; val's noise is its own, test's and
              heldout's the same), judged by the world's detector and
              GenEval's rules: per-tag accuracy and their mean
              (`geneval_overall`);
  VQA         the first `eval.vqa_examples` examples' images and questions
              -> greedy answers, exact match with the true answer, per
              question family, and per true answer within each family
              (recall: a family's accuracy can hide a model that gives
              one answer to every question of the family); for the
              yes/no families, how well the margin of 'yes' over 'no' at
              the answer separates the two (ROC AUC: an accuracy near the
              majority answer's share can be chance or a real reading).
Intervals are 95 %: Wilson's for a proportion (VQA), and for the mean of
per-tag proportions a normal approximation with Agresti-Coull variances.
Every model answers the same questions and prompts (same seeds), so each
pair of models is also compared item by item: the difference of their
scores and a paired 95 % interval (`paired_difference`), narrower than the
two models' own intervals suggest when they agree on most items.
Writes `workdir/eval/results.json` (`{model: {split: {...}}}`),
`vqa_answers.json` (`{model: {split: {family: {answer: [right, asked]}}}}`),
`differences.json` (`{'<model> - <earlier model>': {split:
{geneval_delta, geneval_delta_ci, vqa_delta, vqa_delta_ci}}}`),
`geneval_failures.json` (`{model: {split: {tag: {prompts, failed, missing,
extra, relation, unclassified, more_objects}}}}`: why images fail, by kind
of check, and how many hold more objects than the prompt names),
`yes_no_auc.json` (`{model: {split: {family: ROC AUC}}}`),
`relation_blind.json` (`{model: {split: {prompts, same_layout}}}`: of the
relation prompts, how many draw the same layout with the relation turned
round, `relation_blind`), `outcomes.json` (`{'items': {split: what decides
the split's items and noise}, 'models': {model: {split: {tags, geneval,
vqa}}}}`: every item's verdict, which `lvrpo_jax.compare` pairs across
runs), `results.md` and image grids of the first generations.
"""

import hashlib
import json
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
from lvrpo_jax.train import eval_stats
from lvrpo_jax.train import pretrain
from lvrpo_jax.train import trained
from lvrpo_jax.world import detect
from lvrpo_jax.world import geneval_scores
from lvrpo_jax.world import questions as questions_lib
from lvrpo_jax.world import spec as spec_lib
from lvrpo_jax.world import stage as world_stage
from lvrpo_jax.world import tokenizer as tok
from lvrpo_jax.world import verify
from lvrpo_jax.world.verify import FAILURE_KINDS

# The splits the eval can score (`eval.splits`), and the stream of each
# one's generation noise: test and heldout share one, as they always have;
# val has its own, so that what settings are chosen on shares nothing with
# test but the distribution.
SPLITS = ('test', 'heldout', 'val')
NOISE_STREAM = {'test': 0, 'heldout': 0, 'val': 1}
# A tag's failure tally (`tally_image`) and the failure table's columns:
# prompts, failed images, images failing each kind of check, and images
# holding more objects than the prompt names. Those pass GenEval's rules
# outside `counting`, but a policy those rules reward learns to draw them
# (README "Extra objects").
FAILURE_COLUMNS = ('prompts', 'failed', *FAILURE_KINDS, 'more_objects')
# Model name in the results -> the stage that trains it.
MODELS = {'baseline': 'pretrain', 'sft_continue': 'sft_continue',
          'lvrpo': 'lvrpo'}
YES_NO = ('yes', 'no')
YES_NO_AUC_TITLE = ("Yes/no questions: ROC AUC of the margin logit('yes') - "
                    "logit('no') (0.5: no discrimination)")
RELATION_BLIND_TITLE = (
    'Share of the relation prompts drawn with the same objects in the same '
    'places when the relation is turned round (same noise; a model that '
    'ignores the relation word draws all of them the same)')


def generation_scores(model, ae, records, cfg, seed: int, stream: int = 0):
  """GenEval-style scores of `records`' prompts, with 'tags' and 'passed'
  (each prompt's tag and verdict, in order) and 'failures' ({tag: {column:
  images}} over FAILURE_COLUMNS, `tally_image`); also the first images.
  The noise is a function of (`seed`, `stream`, the record's index)."""
  tokenizer = tok.Tokenizer()
  graphdef, state = nnx.split(model)
  ae_graph, ae_state = nnx.split(ae)

  @jax.jit
  def generate(state, ae_state, prompts, rng):
    return sampling.generate_images(
        nnx.merge(graphdef, state), nnx.merge(ae_graph, ae_state), prompts,
        rng, cfg.sample_steps, cfg.guidance)

  def images_of(texts, start):
    """uint8 images of prompt strings, the batch's noise keyed by `start`
    (a row's noise is the same whatever the prompts)."""
    prompts = np.stack([tokenizer.encode_padded(t, pretrain.PROMPT_LEN,
                                                left=True) for t in texts])
    # Pad the last chunk to the batch size: one compiled shape.
    prompts = np.concatenate([prompts, np.repeat(
        prompts[:1], cfg.batch_size - len(texts), 0)])
    key = jax.random.key(seed)
    if stream:  # Stream 0 keeps the noise that all earlier scores had.
      key = jax.random.fold_in(key, stream)
    return np.asarray(generate(state, ae_state, prompts, jax.random.fold_in(
        key, start)))[:len(texts)]

  tags, passed, images, failures = [], [], [], {}
  for start in range(0, len(records), cfg.batch_size):
    chunk = records[start:start + cfg.batch_size]
    out = images_of([r['prompt'].decode() for r in chunk], start)
    for record, image in zip(chunk, out):
      spec = spec_lib.Spec.from_json(record['spec'].decode())
      tags.append(spec.tag)
      passed.append(tally_image(failures.setdefault(
          spec.tag, dict.fromkeys(FAILURE_COLUMNS, 0)), spec, detect(image)))
    images.extend(out[:max(0, 16 - len(images))])
  scores = geneval_scores(tags, passed)
  return ({**scores, 'tags': tags, 'passed': passed,
           'failures': dict(sorted(failures.items())),
           'relation_blind': relation_blind(images_of, records,
                                            cfg.batch_size)},
          np.stack(images))


def turned_round(prompt: str, spec) -> str | None:
  """`prompt` with its relation turned round ('left of' <-> 'right of',
  'above' <-> 'below'), or None if its spec names no relation or one
  between two objects described alike ('a circle below a circle': one
  picture shows both ways round)."""
  related = [r for r in spec.include if r.relation is not None]
  if not related:
    return None
  if len(related) > 1:
    raise ValueError(f'cannot turn the relations of {prompt!r} round: '
                     'it names more than one')
  req = related[0]
  target = spec.include[req.target]
  if (req.color, req.shape) == (target.color, target.shape):
    return None
  phrase = f' {req.relation} '
  if prompt.count(phrase) != 1:
    raise ValueError(f'cannot turn the relation of {prompt!r} round: '
                     f'{phrase.strip()!r} is not named once')
  return prompt.replace(phrase, f' {spec_lib.CONVERSE[req.relation]} ')


def layout(found) -> list[tuple]:
  """The detector's objects as (colour, shape, box), sorted: two images
  with equal layouts show the same objects in the same places."""
  return sorted((d.color, d.shape, tuple(int(v) for v in d.bbox))
                for d in found)


def relation_blind(images_of, records, batch_size: int) -> dict:
  """Whether the model places objects by the relation word: each relation
  prompt among `records` and its twin with the relation turned round
  (`turned_round`) are drawn from the same noise, and {'prompts': how many
  pairs, 'same_layout': how many drew equal `layout`s} is returned. A
  model that ignores the relation word draws every pair the same.

  Args:
    images_of: (prompt strings, noise key) -> uint8 images, one batch.
    records: the split's records ('prompt', 'spec').
    batch_size: prompts per batch.
  """
  pairs = []
  for r in records:
    prompt = r['prompt'].decode()
    twin = turned_round(prompt, spec_lib.Spec.from_json(r['spec'].decode()))
    if twin is not None:
      pairs.append((prompt, twin))
  # Each prompt is drawn again beside its twin rather than reused from the
  # scoring pass: a twin needs its original's noise, which is tied to the
  # original's row in its batch, so reuse would cost a twin batch per
  # scoring batch; packed pairs take fewer batches.
  same = 0
  for start in range(0, len(pairs), batch_size):
    chunk = pairs[start:start + batch_size]
    asked, turned = (images_of([p[k] for p in chunk], start) for k in (0, 1))
    same += sum(layout(detect(a)) == layout(detect(b))
                for a, b in zip(asked, turned))
  return {'prompts': len(pairs), 'same_layout': int(same)}


def tally_image(tally: dict, spec, found) -> bool:
  """Counts one image into its tag's `tally` (FAILURE_COLUMNS -> images)
  and returns whether it passes GenEval's rules.

  Args:
    tally: the tag's counts, updated in place.
    spec: the prompt's `Spec`.
    found: the detector's objects in the image.
  """
  verdict = verify(spec, found)
  tally['prompts'] += 1
  tally['failed'] += not verdict.passed
  for kind in set(verdict.failures):
    tally[kind] += 1
  tally['more_objects'] += len(found) > spec.named_objects()
  return verdict.passed


def answer_steps(tokens_bt) -> np.ndarray:
  """The step [B] of each answer's last word, the one before its first
  <eos> (the last step where there is none; 0 where <eos> comes first)."""
  tokens_bt = np.asarray(tokens_bt)
  ends = np.where((tokens_bt == tok.EOS).any(axis=1),
                  (tokens_bt == tok.EOS).argmax(axis=1), tokens_bt.shape[1])
  return np.maximum(ends - 1, 0)


def vqa_scores(model, records, cfg):
  """Greedy answers to `records`' questions, each scored on its last word
  (`questions_lib.answer_word`; what follows a rationale): accuracy
  overall and per family, 'per_answer' {family: {true answer: [right,
  asked]}}, 'correct' (each question's match, in order), 'replies' (the
  decoded replies, rationale included, in order) and 'yes_no_auc'
  {family: ROC AUC}: how well the margin logit('yes') - logit('no') at
  that word's step tells the 'yes' questions of a family from its 'no'
  ones (0.5: not at all, whatever the accuracy the majority answer
  earns)."""
  tokenizer = tok.Tokenizer()
  yes_no = [tokenizer.encode(w)[0] for w in YES_NO]
  graphdef, state = nnx.split(model)

  @jax.jit
  def answer(state, pixels, questions):
    tokens, kept = sampling.greedy_answers_and_logits(
        nnx.merge(graphdef, state), pixels, questions,
        questions_lib.ANSWER_TOKENS, yes_no)
    return tokens, kept[..., 0] - kept[..., 1]

  per_answer = {}  # family -> true answer -> [right, asked]
  margins = {}  # family -> ([margin], [truth is 'yes']), yes/no answers
  correct, replies = [], []
  for start in range(0, len(records), cfg.batch_size):
    chunk = records[start:start + cfg.batch_size]
    rows = len(chunk)
    pixels = vae_lib.from_uint8(np.stack([r['image'] for r in chunk]))
    questions = np.stack([tokenizer.encode_padded(
        r['question'].decode(), questions_lib.QUESTION_LEN, left=True)
                          for r in chunk])
    pad = cfg.batch_size - rows
    pixels = jnp.concatenate([pixels, jnp.repeat(pixels[:1], pad, 0)])
    questions = np.concatenate([questions, np.repeat(questions[:1], pad, 0)])
    tokens, margins_bt = (x[:rows] for x in jax.device_get(
        answer(state, pixels, questions)))
    margin = np.take_along_axis(margins_bt, answer_steps(tokens)[:, None],
                                axis=1)[:, 0]
    for record, ids, m in zip(chunk, tokens, margin):
      family, truth = record['family'].decode(), record['answer'].decode()
      tally = per_answer.setdefault(family, {}).setdefault(truth, [0, 0])
      replies.append(tokenizer.decode(ids))
      correct.append(questions_lib.answer_word(replies[-1]) == truth)
      tally[0] += correct[-1]
      tally[1] += 1
      if truth in YES_NO:
        scores, labels = margins.setdefault(family, ([], []))
        scores.append(float(m))
        labels.append(truth == 'yes')
  # Per family: the sums of its answers' tallies.
  per_family = {f: [sum(t[i] for t in a.values()) for i in (0, 1)]
                for f, a in sorted(per_answer.items())}
  hits = sum(h for h, _ in per_family.values())
  n = sum(c for _, c in per_family.values())
  return {'vqa_accuracy': hits / n, 'vqa_ci': eval_stats.wilson(hits, n),
          'per_family': {f: h / c for f, (h, c) in per_family.items()},
          'per_answer': {f: dict(sorted(a.items()))
                         for f, a in sorted(per_answer.items())},
          'correct': correct, 'replies': replies,
          'yes_no_auc': {f: eval_stats.roc_auc(*margins[f])
                         for f in sorted(margins)}}


def run_eval(config, workdir: str) -> None:
  """Scores every trained model on each split of `eval.splits`; writes
  results."""
  cfg = config.eval
  world, sizes = world_stage.world_and_sizes(config)
  data_dir = configs.world_data_dir(config, workdir)
  ae = autoencoder.train_autoencoder(config, workdir, require_complete=True)
  models = {name: trained.model_of(stage, config, workdir)
            for name, stage in MODELS.items()
            if name == 'baseline' or stage in config.stages}
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  results, answers, outcomes, grids = {}, {}, {}, {}
  failures, aucs, blind, items = {}, {}, {}, {}
  for name, model in models.items():
    results[name], answers[name], outcomes[name] = {}, {}, {}
    failures[name], aucs[name], blind[name] = {}, {}, {}
    for split in cfg.splits:
      source = pipeline.open_split(world, sizes, data_dir, split)
      prompts = prompts_of(cfg, split)
      records = [source[i] for i in range(
          min(max(prompts, cfg.vqa_examples), len(source)))]
      items[split] = item_identity(records[:prompts],
                                   records[:cfg.vqa_examples], cfg,
                                   config.seed, NOISE_STREAM[split])
      scores, images = generation_scores(
          model, ae, records[:prompts], cfg, config.seed,
          NOISE_STREAM[split])
      vqa = vqa_scores(model, records[:cfg.vqa_examples], cfg)
      # results.json keeps the training issue's schema; the per-answer
      # tallies go to their own file, the per-item outcomes to the paired
      # comparison.
      answers[name][split] = vqa.pop('per_answer')
      aucs[name][split] = vqa.pop('yes_no_auc')
      failures[name][split] = scores['failures']
      blind[name][split] = scores['relation_blind']
      outcomes[name][split] = {'tags': scores['tags'],
                               'geneval': scores['passed'],
                               'vqa': vqa.pop('correct')}
      del vqa['replies']
      results[name][split] = {
          'geneval_overall': scores['overall'],
          'geneval_ci': eval_stats.mean_of_proportions_ci(scores['per_tag'],
                                               scores['counts']),
          'per_tag': scores['per_tag'], **vqa}
      grids[f'{name}_{split}'] = metrics_lib.image_grid(images, columns=8,
                                                        scale=2)
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(out_dir, 'vqa_answers.json'), 'w') as f:
    json.dump(answers, f, indent=2)
  with open(os.path.join(out_dir, 'geneval_failures.json'), 'w') as f:
    json.dump(failures, f, indent=2)
  with open(os.path.join(out_dir, 'yes_no_auc.json'), 'w') as f:
    json.dump(aucs, f, indent=2)
  with open(os.path.join(out_dir, 'relation_blind.json'), 'w') as f:
    json.dump(blind, f, indent=2)
  deltas = eval_stats.differences(outcomes)
  with open(os.path.join(out_dir, 'differences.json'), 'w') as f:
    json.dump(deltas, f, indent=2)
  with open(os.path.join(out_dir, eval_stats.OUTCOMES_FILE), 'w') as f:
    json.dump({'items': items, 'models': outcomes}, f)
  table = markdown_table(results)
  if deltas:
    table += '\n' + difference_table(deltas)
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(table + '\n' + breakdown_tables(results) + '\n'
            + failure_table(failures) + '\n' + answer_table(answers) + '\n'
            + model_split_table(YES_NO_AUC_TITLE, aucs) + '\n'
            + model_split_table(RELATION_BLIND_TITLE, {
                name: {split: {'same layout': b['same_layout'] / b['prompts']
                               if b['prompts'] else None}
                       for split, b in splits.items()}
                for name, splits in blind.items()}))
  with metrics_lib.MetricsWriter(out_dir) as writer:
    writer.write_images(0, grids)
  print(table, flush=True)


def item_identity(gen_records, vqa_records, cfg, seed: int,
                  stream: int) -> dict:
  """What decides a split's items and their noise: two evals that agree on
  it scored the same prompts with the same noise and asked the same
  questions of the same images, so their outcomes pair item by item."""
  digest = lambda parts: hashlib.blake2b(
      b'\0'.join(parts), digest_size=8).hexdigest()
  return {'prompts': digest([r['prompt'] for r in gen_records]),
          'questions': digest([r['question'] + b'\0' + r['image'].tobytes()
                               for r in vqa_records]),
          'seed': seed, 'stream': stream, 'batch_size': cfg.batch_size,
          'sample_steps': cfg.sample_steps, 'guidance': cfg.guidance}


def prompts_of(cfg, split: str) -> int:
  """How many of `split`'s first prompts GenEval scores (`cfg` is
  config.eval): LVRPO draws held-out prompts only from those after them."""
  return cfg.heldout_examples if split == 'heldout' else cfg.num_examples


def difference_table(deltas: dict) -> str:
  """Markdown: the paired differences, with 95 % intervals; an interval
  that excludes 0 is a difference beyond the evaluation's sampling."""
  lines = ['Differences, paired over the same prompts and questions '
           '(95 % CI):', '',
           '| models | split | GenEval overall | VQA |', '|---|---|---|---|']
  for pair, splits in deltas.items():
    for split, d in splits.items():
      cells = (eval_stats.cell(d[k], d[k + '_ci'], signed=True)
               for k in ('geneval_delta', 'vqa_delta'))
      lines.append(f'| {pair} | {split} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def breakdown_tables(results: dict) -> str:
  """Markdown: GenEval per tag and VQA per question family, a row per
  model and split ('-' where a split has no prompt of a tag)."""
  return '\n'.join(
      model_split_table(title, {name: {split: r[key] for split, r in
                                       splits.items()}
                                for name, splits in results.items()})
      for key, title in (('per_tag', 'GenEval per tag'),
                         ('per_family', 'VQA per question family')))


def model_split_table(title: str, values: dict) -> str:
  """Markdown: `values` {model: {split: {column: number}}} as a row per
  model and split, a column per key ('-' where a row lacks it)."""
  columns = sorted({c for splits in values.values()
                    for row in splits.values() for c in row})
  out = [f'{title}:', '', '| model | split | ' + ' | '.join(columns) + ' |',
         '|---|---|' + '---|' * len(columns)]
  for name, splits in values.items():
    for split, row in splits.items():
      cells = ('-' if row.get(c) is None else f'{row[c]:.3f}'
               for c in columns)
      out.append(f'| {name} | {split} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(out) + '\n'


def failure_table(failures: dict) -> str:
  """Markdown: a row per model and split (`failures[model][split]` is
  `generation_scores`' {tag: tally}): prompts, failed images, the images
  failing each kind of check (an image can fail several kinds) and those
  holding more objects than named, summed over tags."""
  out = ['GenEval failures by kind (images failing a check of that kind; '
         'one image can fail several; more_objects: images holding more '
         'objects than the prompt names, passing or not):', '',
         '| model | split | ' + ' | '.join(FAILURE_COLUMNS) + ' |',
         '|---|---|' + '---|' * len(FAILURE_COLUMNS)]
  for name, splits in failures.items():
    for split, tags in splits.items():
      cells = (str(sum(t[c] for t in tags.values())) for c in FAILURE_COLUMNS)
      out.append(f'| {name} | {split} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(out) + '\n'


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
      lines.append(
          f"| {name} | {split} | "
          f"{eval_stats.cell(r['geneval_overall'], r['geneval_ci'])} | "
          f"{eval_stats.cell(r['vqa_accuracy'], r['vqa_ci'])} |")
  return '\n'.join(lines) + '\n'
