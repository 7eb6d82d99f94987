r"""Can the tiny unified model learn the world's relation questions at all?

  python benchmarks/relations.py [--out=benchmarks/results/relations.json] \
      [--steps=1500] [--runs=color:tiny,relation:tiny,...]

Every model of the default run answers the test split's relation questions
("is the red circle left of the blue square ?") near chance (README
"Training stages"), and they are most of what its test VQA gets wrong. This
script asks whether that is a matter of data: it trains a fresh unified
model (`model.preset`, understanding path only) on one question family
with a fresh question drawn for every row of every step, so the family gets
all of the batch and the data never repeats, and measures greedy accuracy
(`evaluate.vqa_scores`, the eval stage's own path) on one question of the
family per test-split scene, as training goes.

Runs (`--runs`, family:variant[:data]):
  color:tiny             the control: a one-object lookup ('what color is
                         the square ?'); it must be learned, or the harness
                         is broken;
  relation:tiny          the preset as the default run trains it (with
                         `vit_pos_embed` since the rationale answers; the
                         stored relations.json and relations_variants.json
                         were measured before, when it had none: their
                         `tiny` is today's `no_vit_pos_embed`);
  relation:vit_pos_embed  plus BAGEL's fixed 2-D sin-cos embedding of the
                         patch grid on the image tokens (the position of
                         each object spelled out in its token);
  relation:no_vit_pos_embed  the preset without it;
  relation:depth8        that, with 8 backbone layers instead of 4;
  relation:no_qk_norm    that, without the backbone's q/k RMSNorm (which
                         bounds attention logits at init).
Not run by default:
  relation:vit_depth4    the preset with a 4-layer ViT instead of 2 (each
                         patch can take in its neighbours first);
  relation:tiny:two_objects      train and test scenes of exactly two
                         objects only: no object but the two named;
  relation:tiny:cell_curriculum  half of the training rows a one-object
                         cell question instead ('is the red circle left
                         ?': 'yes' when it is in the two left columns;
                         'right', 'above', 'below' alike), which the tiny
                         model learns alone; scored on relations.
  relation:vit_pos_embed:rationale  every answer spelled out with the
                         grid cells of the two objects named first ('is
                         the red circle left of the blue square ?' ->
                         'one zero one two yes': row and column of the
                         circle, then of the square; the world's
                         `Question.rationale`), decoded greedily in full
                         and scored on its last word as the eval stage
                         scores (with the share whose rationale is also
                         right);
                         `no_vit_pos_embed:rationale` alike, without the
                         patch-grid embedding.

Before the runs, a reference that needs no training: how well the answer
follows from a few of the scene's facts, as the area under the ROC curve
of a count table P(yes | key) fitted on 20,000 fresh train questions and
scored on the same test questions: keys the relation word alone, with the
grid cell of the first object named ('is the red circle ...'), of the
second, or of both (1.0: the answer is a function of them). A model that
finds the first object's cell and reads the relation word has the second
of these within reach.

Each run records, every steps / 5 steps: the train loss (per answer
token, <eos> included), the greedy accuracy and, for yes/no families, the
area under the ROC curve of the 'yes' - 'no' logit margin at the answer
(0.5: no discrimination; accuracy can sit above 0.5 on the question's
priors alone), and the majority answer's share. Optimizer as the
`pretrain` stage's (AdamW, warmup + cosine, its learning rate).

Takes ~25 min on 2 CPU cores (4-8 min a run).
"""

import argparse
import copy
import dataclasses
import re
import time

import jax
import numpy as np
from flax import nnx

import report
from lvrpo_jax import allocator
from lvrpo_jax.models import presets
from lvrpo_jax.models import unified
from lvrpo_jax.models import vae
from lvrpo_jax.train import eval_stats
from lvrpo_jax.train import evaluate
from lvrpo_jax.train import optimizer
from lvrpo_jax.train import pretrain
from lvrpo_jax.world import examples
from lvrpo_jax.world import objects
from lvrpo_jax.world import questions
from lvrpo_jax.world import scene as scene_lib

DEFAULT_RUNS = ('color:tiny', 'relation:tiny', 'relation:vit_pos_embed',
                'relation:depth8', 'relation:no_qk_norm')


def variant(ucfg: unified.UnifiedConfig, name: str) -> unified.UnifiedConfig:
  """The preset's config with one of the variants above applied."""
  if name == 'tiny':
    return ucfg
  if name == 'no_vit_pos_embed':
    return dataclasses.replace(ucfg, vit_pos_embed=False)
  if name == 'vit_depth4':
    return dataclasses.replace(ucfg, vit=dataclasses.replace(ucfg.vit,
                                                             depth=4))
  ucfg = dataclasses.replace(ucfg, vit_pos_embed=True)
  if name == 'vit_pos_embed':
    return ucfg
  if name == 'depth8':
    return dataclasses.replace(
        ucfg, text=dataclasses.replace(ucfg.text, num_layers=8))
  if name == 'no_qk_norm':
    return dataclasses.replace(
        ucfg, text=dataclasses.replace(ucfg.text, qk_norm=False))
  raise ValueError(f'unknown variant {name!r}')


class ScenePool:
  """The first `num_scenes` scenes of a split and their images, rendered
  once and shared by every run's questions."""

  def __init__(self, world, split: str, num_scenes: int):
    self.world, self.heldout = world, split == 'heldout'
    self.scenes = [examples.make_example(world, split, i).scene
                   for i in range(num_scenes)]
    self.images = [scene_lib.render(s) for s in self.scenes]

  def subset(self, keep) -> 'ScenePool':
    """The pool of the scenes `keep(scene)` accepts (images shared)."""
    out = copy.copy(self)
    kept = [i for i, s in enumerate(self.scenes) if keep(s)]
    out.scenes = [self.scenes[i] for i in kept]
    out.images = [self.images[i] for i in kept]
    return out


# One-object cell questions ('is the red circle left ?') of the
# cell_curriculum data: 'yes' when the object's (row, column) satisfies.
CELL_WORDS = {'left': lambda row, col: col < objects.GRID_CELLS // 2,
              'right': lambda row, col: col >= objects.GRID_CELLS // 2,
              'above': lambda row, col: row < objects.GRID_CELLS // 2,
              'below': lambda row, col: row >= objects.GRID_CELLS // 2}


def cell_question(rng, scene) -> questions.Question | None:
  """A yes/no question about the grid cell of an object whose colour and
  shape are unique in `scene`, or None if it has none."""
  pairs = [(o.color, o.shape) for o in scene.objects]
  unique = [o for o, p in zip(scene.objects, pairs) if pairs.count(p) == 1]
  if not unique:
    return None
  obj = unique[int(rng.integers(len(unique)))]
  word = list(CELL_WORDS)[int(rng.integers(len(CELL_WORDS)))]
  cell = objects.cell_size(scene.image_size)
  yes = CELL_WORDS[word](obj.y0 // cell, obj.x0 // cell)
  return questions.Question('relation', f'is the {obj.color} {obj.shape} '
                            f'{word} ?', 'yes' if yes else 'no')


class Questions:
  """Fresh questions of one family about a pool of scenes."""

  def __init__(self, pool: ScenePool, family: str, cell_share: float = 0.0,
               rationale: bool = False):
    """`cell_share` of the questions are `cell_question`s instead; with
    `rationale`, replies spell out the question's rationale first."""
    self.world, self.family, self.cell_share = pool.world, family, cell_share
    self.rationale = rationale
    self.heldout, self.scenes, self.images = (pool.heldout, pool.scenes,
                                              pool.images)
    self.allowed = (None if self.heldout
                    else self.world.heldout.allowed_pairs())
    self.layout = pretrain.PretrainExamples(rationale=rationale)

  def ask(self, rng, i):
    """A question about scene i, or None (none of the family, or it names
    a held-out composition outside the held-out split)."""
    if self.cell_share and rng.random() < self.cell_share:
      return cell_question(rng, self.scenes[i])
    q = questions.ask(rng, self.scenes[i], self.family, self.allowed)
    if q is None or (not self.heldout and self.world.heldout.names(
        q.pairs, q.relations)):
      return None
    return q

  def records(self, seed: int) -> list[dict]:
    """One question per scene that has one, as the eval stage's records."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(len(self.scenes)):
      q = self.ask(rng, i)
      if q is not None:
        out.append({'image': self.images[i], 'family': q.family.encode(),
                    'question': q.text.encode(), 'answer': q.answer.encode(),
                    'scene': i, 'target': self.answer_text(q)})
    return out

  def answer_text(self, q) -> str:
    """The reply the model is trained to give to q."""
    return q.reply(self.rationale)

  def draw(self, rng):
    """(scene index, question) about a random scene that has one."""
    while True:
      i = int(rng.integers(len(self.scenes)))
      q = self.ask(rng, i)
      if q is not None:
        return i, q

  def batch(self, rng, size: int) -> dict:
    """[size] training rows in the `pretrain` stage's question layout:
    image, text ([T] question answer <eos>, right-padded) and the target
    mask over the answer and <eos>."""
    rows = []
    for _ in range(size):
      i, q = self.draw(rng)  # Index 0: the question, not the caption.
      rows.append(self.layout.map({
          'index': 0, 'image': self.images[i], 'question': q.text,
          'answer': q.answer, 'rationale': q.rationale, 'caption': '',
          'prompt': ''}))
    return {k: np.stack([r[k] for r in rows])
            for k in ('image', 'text', 'target')}


LOOKUP_QUESTIONS = 20_000
RELATION_TEXT = re.compile(r'is the (\w+) (\w+) (.+) the (\w+) (\w+) \?')
LOOKUP_KEYS = {
    'relation': lambda rel, a, b: rel,
    'relation + cell of the first object': lambda rel, a, b: (rel, a),
    'relation + cell of the second object': lambda rel, a, b: (rel, b),
    'relation + both cells': lambda rel, a, b: (rel, a, b),
}


def relation_facts(question: str, scene) -> tuple[str, tuple, tuple]:
  """(relation word, (row, column) of the first object's grid cell, the
  second's) of a relation question about `scene`."""
  color_a, shape_a, relation, color_b, shape_b = RELATION_TEXT.fullmatch(
      question).groups()
  cell = objects.cell_size(scene.image_size)

  def find(color, shape):
    obj, = (o for o in scene.objects if (o.color, o.shape) == (color, shape))
    return obj.y0 // cell, obj.x0 // cell

  return relation, find(color_a, shape_a), find(color_b, shape_b)




def lookup_aucs(train: Questions, test: Questions, test_records,
                num_questions: int, seed: int) -> dict[str, float]:
  """ROC AUC on `test_records` of P(yes | key) counted over `num_questions`
  fresh train questions, per key of LOOKUP_KEYS (add-one smoothing; a key
  never seen scores 0.5)."""
  rng = np.random.default_rng(seed)
  tables = {name: {} for name in LOOKUP_KEYS}
  for _ in range(num_questions):
    i, q = train.draw(rng)
    facts = relation_facts(q.text, train.scenes[i])
    for name, key in LOOKUP_KEYS.items():
      tally = tables[name].setdefault(key(*facts), [0, 0])
      tally[0] += q.answer == 'yes'
      tally[1] += 1
  labels = [r['answer'] == b'yes' for r in test_records]
  facts = [relation_facts(r['question'].decode(), test.scenes[r['scene']])
           for r in test_records]
  out = {}
  for name, key in LOOKUP_KEYS.items():
    scores = []
    for f in facts:
      yes, n = tables[name].get(key(*f), (0, 0))
      scores.append((yes + 1) / (n + 2))
    out[name] = eval_stats.roc_auc(scores, labels)
  return out


DATA = ('all', 'two_objects', 'cell_curriculum', 'rationale')


def train_run(config, pools: dict[str, ScenePool], family: str,
              variant_name: str, steps: int, data: str = 'all') -> dict:
  if data not in DATA:
    raise ValueError(f'unknown data {data!r}; one of {DATA}')
  if data == 'two_objects':
    pools = {k: p.subset(lambda s: len(s.objects) == 2)
             for k, p in pools.items()}
  rationale = data == 'rationale'
  train = Questions(pools['train'], family,
                    cell_share=0.5 if data == 'cell_curriculum' else 0.0,
                    rationale=rationale)
  test = Questions(pools['test'], family, rationale=rationale)
  test_records = test.records(seed=1)
  answers = [r['answer'].decode() for r in test_records]
  majority = max(answers.count(a) for a in set(answers)) / len(answers)

  ucfg = variant(presets.from_config(config.model)[0], variant_name)
  model = unified.UnifiedModel(ucfg, rngs=nnx.Rngs(config.seed))
  section = config.pretrain
  tx = optimizer.make(optimizer.OptimizerConfig(
      learning_rate=section.learning_rate,
      warmup_steps=min(section.warmup_steps, steps - 1), total_steps=steps,
      weight_decay=section.weight_decay))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, opt, batch):
    def loss_fn(model):
      total, count = pretrain.text_loss(model, vae.from_uint8(batch['image']),
                                        batch['text'], batch['target'])
      return total / count
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  rng = np.random.default_rng(config.seed)
  batch_size = config.pretrain.batch_size
  curve, losses = [], []
  start = time.time()
  every = max(1, steps // 5)
  for step in range(1, steps + 1):
    losses.append(float(train_step(model, opt, train.batch(rng, batch_size))))
    if step % every == 0 or step == steps:
      # Scored on each reply's last word, after any rationale.
      vqa = evaluate.vqa_scores(model, test_records, config.eval)
      point = {'step': step, 'train_loss': float(np.mean(losses[-every:])),
               'accuracy': vqa['vqa_accuracy'], 'accuracy_ci': vqa['vqa_ci'],
               'roc_auc': vqa['yes_no_auc'].get(family)}
      if rationale:  # The whole reply right, the rationale included.
        point['rationale_match'] = float(np.mean(
            [reply == r['target']
             for reply, r in zip(vqa['replies'], test_records)]))
      curve.append(point)
      auc = ('' if point['roc_auc'] is None
             else f', AUC {point["roc_auc"]:.3f}')
      if rationale:
        auc += f', rationale right {point["rationale_match"]:.3f}'
      print(f'  {family}:{variant_name}:{data} step {step}: loss '
            f'{point["train_loss"]:.3f}, accuracy {point["accuracy"]:.3f}'
            f'{auc} ({time.time() - start:.0f} s)', flush=True)
  return {'family': family, 'variant': variant_name, 'data': data,
          'test_questions': len(test_records), 'majority_share': majority,
          'curve': curve, 'seconds': time.time() - start}


def parse_run(run: str) -> tuple[str, str, str]:
  """'family:variant[:data]' -> (family, variant, data), checked before
  any scene is rendered."""
  parts = run.split(':')
  if len(parts) not in (2, 3):
    raise SystemExit(f'--runs: {run!r} is not family:variant[:data]')
  family, name, data = (*parts, 'all')[:3]
  if family not in questions.FAMILIES:
    raise SystemExit(f'--runs: unknown family {family!r} in {run!r}')
  if data not in DATA:
    raise SystemExit(f'--runs: unknown data {data!r} in {run!r}; one of '
                     f'{DATA}')
  if data == 'rationale' and family != 'relation':
    raise SystemExit(f'--runs: {run!r}: the rationale data is for '
                     'relation questions')
  return family, name, data


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='benchmarks/results/relations.json')
  parser.add_argument('--steps', type=int, default=1500)
  parser.add_argument('--scenes', type=int, default=20_000,
                      help='train-split scenes the questions are drawn about')
  parser.add_argument('--runs', default=','.join(DEFAULT_RUNS),
                      help="family:variant[:data],...; '' only the "
                      'lookup reference')
  args = parser.parse_args()
  config = report.default_config()
  runs = [parse_run(r) for r in args.runs.split(',') if r]
  for _, name, _ in runs:  # An unknown variant fails here, not at its run.
    try:
      variant(presets.from_config(config.model)[0], name)
    except ValueError as e:
      raise SystemExit(f'--runs: {e}') from e
  results = {'machine': report.machine(backend=jax.default_backend()),
             'model': config.model.preset, 'steps': args.steps,
             'batch_size': config.pretrain.batch_size,
             'train_scenes': args.scenes, 'runs': []}
  world = examples.WorldSpec.from_config(config.world, config.seed)
  pools = {'train': ScenePool(world, 'train', args.scenes),
           'test': ScenePool(world, 'test', config.world.num_test)}
  if not runs or any(family == 'relation' for family, *_ in runs):
    train, test = (Questions(pools[split], 'relation') for split in ('train',
                                                                     'test'))
    results['lookup_auc'] = lookup_aucs(train, test, test.records(seed=1),
                                        LOOKUP_QUESTIONS, config.seed)
    for key, auc in results['lookup_auc'].items():
      print(f'lookup AUC, {key}: {auc:.3f}', flush=True)
  for family, name, data in runs:
    print(f'{family}:{name}:{data} ...', flush=True)
    results['runs'].append(train_run(config, pools, family, name,
                                     args.steps, data))
  for r in results['runs']:
    last = r['curve'][-1]
    auc = '' if last['roc_auc'] is None else f', AUC {last["roc_auc"]:.3f}'
    print(f'{r["family"]}:{r["variant"]}:{r["data"]}: accuracy '
          f'{last["accuracy"]:.3f} (majority answer '
          f'{r["majority_share"]:.3f}){auc}')
  report.write(results, args.out)


if __name__ == '__main__':
  allocator.reexec()  # As the training job runs (lvrpo_jax/allocator.py).
  main()
