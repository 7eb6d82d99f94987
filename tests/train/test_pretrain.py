"""The `pretrain` stage: its example layout by hand, its loss wiring, and
the stage end to end (slow)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvrpo_jax.models import presets
from lvrpo_jax.models import unified
from lvrpo_jax.train import pretrain
from lvrpo_jax.world import tokenizer as tok

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
T = tok.Tokenizer()


def _record(index):
  return {'index': index, 'image': np.zeros((32, 32, 3), np.uint8),
          'question': 'what color is the square ?', 'answer': 'red',
          'caption': 'a red square', 'prompt': 'a photo of a red square'}


def test_question_examples_score_only_the_answer_and_eos():
  out = pretrain.PretrainExamples(text_len=10, prompt_len=8).map(_record(0))
  q = T.encode('what color is the square ?')
  assert out['text'].tolist() == q + T.encode('red') + [tok.EOS, tok.PAD,
                                                        tok.PAD]
  assert out['target'].tolist() == [0] * 6 + [1, 1, 0, 0]
  # Prompts are left-padded so the latents that follow sit at a fixed span.
  assert out['prompt'].tolist() == [tok.PAD] * 2 + T.encode(
      'a photo of a red square')


def test_question_examples_with_a_rationale_score_it_too():
  record = {**_record(0), 'question': 'is the red circle left of the blue '
            'square ?', 'answer': 'yes', 'rationale': 'one zero one two'}
  q = T.encode(record['question'])
  out = pretrain.PretrainExamples(text_len=17, prompt_len=8).map(record)
  assert out['text'].tolist() == q + T.encode('one zero one two yes') + [
      tok.EOS, tok.PAD]
  assert out['target'].tolist() == [0] * 10 + [1] * 6 + [0]
  bare = pretrain.PretrainExamples(text_len=17, prompt_len=8,
                                   rationale=False).map(record)
  assert bare['text'].tolist() == q + T.encode('yes') + [tok.EOS] + [
      tok.PAD] * 5
  assert bare['target'].tolist() == [0] * 10 + [1, 1] + [0] * 5
  # The longest relation question and its reply fit the stage's layout.
  longest = {**record, 'question': 'is the yellow triangle right of the '
             'purple square ?'}
  assert pretrain.PretrainExamples().map(longest)['text'][-1] == tok.EOS


def test_caption_examples_score_the_whole_caption():
  out = pretrain.PretrainExamples(text_len=6, prompt_len=8).map(_record(1))
  assert out['text'].tolist() == T.encode('a red square') + [tok.EOS,
                                                             tok.PAD, tok.PAD]
  assert out['target'].tolist() == [1, 1, 1, 1, 0, 0]


def test_loss_is_text_ce_plus_weighted_flow():
  cfg, _ = presets.tiny()
  model = unified.UnifiedModel(cfg, rngs=nnx.Rngs(0))
  examples = [pretrain.PretrainExamples().map(_record(i)) for i in range(2)]
  batch = {k: jnp.asarray(np.stack([e[k] for e in examples]))
           for k in examples[0]}
  latents = jnp.ones((2, 4, 4, 8))
  rng = jax.random.key(0)
  # Jitted: op by op, the loss and its reference took 25 s to compile with
  # an empty compilation cache, against 9 s jitted.
  total, (count, aux) = jax.jit(lambda m: pretrain.pretrain_loss(
      m, batch, rng, encode=lambda p: latents, flow_weight=0.5,
      prompt_dropout=0.0))(model)

  @jax.jit
  def reference(model):
    logits = model.understanding_logits(
        batch['image'].astype(jnp.float32) / 127.5 - 1, batch['text'])
    text = unified.text_loss(logits[:, :-1], batch['text'][:, 1:],
                             batch['target'][:, 1:])
    keys = jax.vmap(jax.random.split)(
        unified.example_keys(rng, batch['index']))
    return text, unified.flow_loss(model, batch['prompt'], latents,
                                   keys[:, 1])

  (t_sum, t_n), (f_sum, f_n) = reference(model)
  want = (t_sum / t_n + 0.5 * f_sum / f_n) * 2
  assert float(total) == pytest.approx(float(want), rel=1e-5)
  assert float(count) == 2
  assert float(aux['text_loss']) == pytest.approx(float(t_sum / t_n),
                                                  rel=1e-5)


@pytest.mark.slow
def test_stages_run_after_vae_and_refuse_without_it(tmp_path):
  def main(*stages_and_flags):
    return subprocess.run(
        [sys.executable, '-m', 'lvrpo_jax.main',
         '--config=configs/base.py:world_preview', f'--workdir={tmp_path}',
         '--config.world.num_train=256', '--config.world.num_test=32',
         '--config.world.num_heldout=16', '--config.vae.steps=10',
         '--config.world.num_val=16',
         '--config.vae.warmup_steps=2', '--config.vae.eval_examples=16',
         '--config.pretrain.steps=6', '--config.pretrain.warmup_steps=2',
         '--config.pretrain.batch_size=8', '--config.train.log_every=3',
         *stages_and_flags],
        cwd=_ROOT, capture_output=True, text=True, timeout=600, check=False)
  refused = main("--config.stages=('world', 'pretrain')")
  assert refused.returncode == 1
  assert "stage 'vae' is not trained" in refused.stderr
  ran = main("--config.stages=('world', 'vae', 'pretrain', 'eval')",
             "--config.eval.splits=('test', 'heldout', 'val')",
             '--config.eval.num_examples=16', '--config.eval.batch_size=8',
             '--config.eval.sample_steps=2')
  assert ran.returncode == 0, ran.stderr[-3000:]
  assert (tmp_path / 'pretrain' / 'metrics.jsonl').exists()
  results = json.loads((tmp_path / 'eval' / 'results.json').read_text())
  for split in ('test', 'heldout', 'val'):
    r = results['baseline'][split]
    assert set(r) == {'geneval_overall', 'geneval_ci', 'vqa_accuracy',
                      'vqa_ci', 'per_tag', 'per_family'}
    for key in ('geneval_overall', 'vqa_accuracy'):
      assert 0.0 <= r[key] <= 1.0
    for key in ('geneval_ci', 'vqa_ci'):
      assert 0.0 <= r[key][0] <= r[key][1] <= 1.0
  # The per-answer tallies add up to each family's accuracy.
  answers = json.loads((tmp_path / 'eval' / 'vqa_answers.json').read_text())
  for split in ('test', 'heldout', 'val'):
    per_family = results['baseline'][split]['per_family']
    tallies = answers['baseline'][split]
    assert set(tallies) == set(per_family)
    for family, by_answer in tallies.items():
      right = sum(r for r, _ in by_answer.values())
      asked = sum(n for _, n in by_answer.values())
      assert right / asked == pytest.approx(per_family[family])
  assert '| baseline | heldout |' in ran.stdout
  assert '| baseline | val |' in ran.stdout
  # The failure tallies agree with the per-tag accuracies.
  failures = json.loads(
      (tmp_path / 'eval' / 'geneval_failures.json').read_text())
  for split in ('test', 'heldout', 'val'):
    per_tag = results['baseline'][split]['per_tag']
    tallies = failures['baseline'][split]
    assert set(tallies) == set(per_tag)
    for tag, t in tallies.items():
      assert 1 - t['failed'] / t['prompts'] == pytest.approx(per_tag[tag])
      assert all(t[k] <= t['failed'] for k in ('missing', 'extra',
                                              'relation', 'unclassified'))
      assert t['more_objects'] <= t['prompts']
  # Yes/no AUCs for exactly the families with both answers asked.
  aucs = json.loads((tmp_path / 'eval' / 'yes_no_auc.json').read_text())
  for split in ('test', 'heldout', 'val'):
    both = {f for f, a in answers['baseline'][split].items()
            if {'yes', 'no'} <= set(a)}
    split_aucs = aucs['baseline'][split]
    assert {f for f, v in split_aucs.items() if v is not None} == both
    assert all(0.0 <= split_aucs[f] <= 1.0 for f in both)
  report = (tmp_path / 'eval' / 'results.md').read_text()
  assert 'VQA recall per true answer' in report
  assert 'GenEval failures by kind' in report
  assert 'Yes/no questions: ROC AUC' in report
  # The baseline alone: nothing to compare it with.
  assert 'paired over' not in report
  assert json.loads((tmp_path / 'eval' / 'differences.json').read_text()) == {}
  # Every item's verdict, which the comparison across runs pairs: the
  # baseline against itself is level, and its scores are the eval's.
  outcomes = json.loads((tmp_path / 'eval' / 'outcomes.json').read_text())
  assert set(outcomes['items']) == {'test', 'heldout', 'val'}
  assert outcomes['items']['val']['stream'] == 1
  compared = subprocess.run(
      [sys.executable, '-m', 'lvrpo_jax.compare', '--split=val',
       f'{tmp_path}:baseline', str(tmp_path)], cwd=_ROOT,
      capture_output=True, text=True, check=False)
  assert compared.returncode == 0, compared.stderr
  val = results['baseline']['val']
  rows = [line.split(' | ') for line in compared.stdout.splitlines()
          if line.startswith(f'| {tmp_path}')]
  assert len(rows) == 2
  for row in rows:
    assert row[1].startswith(f"{val['geneval_overall']:.3f} [")
    assert row[2].startswith(f"{val['vqa_accuracy']:.3f} [")
  assert rows[1][3].startswith('+0.000 [') and rows[1][4].startswith('+0.000 [')
