"""The inference CLIs (generate, answer): input checks, and — slow — the
whole `smoke` pipeline end to end, then both CLIs on its checkpoints."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lvrpo_jax import answer
from lvrpo_jax import generate
from lvrpo_jax.train import trained
from lvrpo_jax.world import tokenizer as tok

_ROOT = pathlib.Path(__file__).parents[1]


def test_read_prompts_left_pads_and_names_bad_lines(tmp_path):
  path = tmp_path / 'prompts.txt'
  path.write_text('a photo of a red circle\nthree squares\n')
  prompts = generate.read_prompts(str(path))
  assert prompts.shape == (2, 16)
  t = tok.Tokenizer()
  assert t.decode(prompts[1]) == 'three squares'
  assert prompts[1, 0] == tok.PAD and prompts[1, -1] != tok.PAD
  path.write_text('a red circle\na pink circle\n')
  with pytest.raises(ValueError, match=r"prompts.txt:2: .*'pink'"):
    generate.read_prompts(str(path))
  path.write_text('a red circle\n\n')
  with pytest.raises(ValueError, match='prompts.txt:2: empty prompt'):
    generate.read_prompts(str(path))


def test_read_questions_checks_images_and_words(tmp_path):
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / 'a.png')
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / 'b.png')
  path = tmp_path / 'q.jsonl'
  line = lambda image, q: json.dumps({'image': image, 'question': q})
  path.write_text(line('a.png', 'how many circles are there ?') + '\n')
  records, images, questions = answer.read_questions(str(path), 32)
  assert records[0]['image'] == 'a.png' and images.shape == (1, 32, 32, 3)
  assert questions.shape == (1, 14)
  for bad, match in ((line('b.png', 'how many circles are there ?'),
                      'the model takes 32x32'),
                     (line('c.png', 'how many circles are there ?'),
                      'c.png'),
                     (line('a.png', 'how many dogs are there ?'), "'dogs'"),
                     ('{"image": "a.png"}', 'question')):
    path.write_text(line('a.png', 'is there a red circle ?') + '\n' + bad)
    with pytest.raises(ValueError, match=f'q.jsonl:2: .*{match}'):
      answer.read_questions(str(path), 32)


def test_a_directory_without_config_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='no config.json'):
    trained.read_config(str(tmp_path / 'lvrpo'))
  with pytest.raises(ValueError, match="stage 'vae' has no unified model"):
    trained.load(str(tmp_path / 'vae'))


def test_a_config_written_before_newer_keys_reads_as_it_ran(
    tmp_path, base_config):
  config = base_config('')
  del config.model['dtype']
  del config.model['scan_layers']
  del config.model['remat']
  del config.model['remat_policy']
  del config.lvrpo['und_oversample']
  del config.lvrpo['train_transitions']
  del config.lvrpo['scale_by_mean']
  # Before vqa_examples and heldout_examples, num_examples (500) was every
  # split's examples of both kinds.
  config.eval.num_examples = 500
  del config.eval['vqa_examples']
  del config.eval['heldout_examples']
  del config['compile_cache_dir']
  for key in ('guidance_interval', 'guidance_renorm', 'guidance_renorm_min'):
    del config.lvrpo[key]
  (tmp_path / 'lvrpo').mkdir()
  (tmp_path / 'lvrpo' / 'config.json').write_text(config.to_json())
  read = trained.read_config(str(tmp_path / 'lvrpo'))
  assert read.model.dtype == 'float32' and read.lvrpo.und_oversample == 1
  assert not read.model.scan_layers and read.model.remat_policy == 'full'
  assert read.lvrpo.train_transitions == 0 and read.lvrpo.scale_by_mean == ()
  assert read.eval.vqa_examples == read.eval.num_examples == 500
  assert read.eval.heldout_examples == 500
  assert read.compile_cache_dir == ''
  assert read.lvrpo.guidance_interval == (0.0, 1.0)
  assert not read.lvrpo.guidance_renorm


def _run(*args):
  return subprocess.run([sys.executable, '-m', *args], cwd=_ROOT,
                        capture_output=True, text=True, timeout=900,
                        check=False)


# The second run: the layers stacked, scanned and rematerialized, and a
# subset of the transitions replayed, through every stage and both CLIs
# (the decoders and samplers step the scanned model inside jax loops).
@pytest.mark.slow
@pytest.mark.parametrize('overrides', [
    (), ('--config.model.scan_layers=True', '--config.model.remat=True',
         '--config.model.remat_policy=dots',
         '--config.lvrpo.train_transitions=2')], ids=['default', 'scanned'])
def test_smoke_pipeline_then_both_clis(tmp_path, overrides):
  workdir = tmp_path / 'run'
  result = _run('lvrpo_jax.main', '--config=configs/base.py:smoke',
                f'--workdir={workdir}', *overrides)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((workdir / 'eval' / 'results.json').read_text())
  assert sorted(results) == ['baseline', 'lvrpo', 'sft_continue']
  for splits in results.values():
    assert sorted(splits) == ['heldout', 'test']
    for r in splits.values():
      assert 0 <= r['geneval_overall'] <= 1 and 0 <= r['vqa_accuracy'] <= 1
      assert r['geneval_ci'][0] <= r['geneval_overall'] <= r['geneval_ci'][1]
  # The paired differences are the models' own scores' differences.
  deltas = json.loads((workdir / 'eval' / 'differences.json').read_text())
  assert list(deltas) == ['sft_continue - baseline', 'lvrpo - baseline',
                          'lvrpo - sft_continue']
  for pair, splits in deltas.items():
    name, earlier = pair.split(' - ')
    for split, d in splits.items():
      for key, score in (('geneval', 'geneval_overall'),
                         ('vqa', 'vqa_accuracy')):
        assert d[f'{key}_delta'] == pytest.approx(
            results[name][split][score] - results[earlier][split][score])
        assert d[f'{key}_delta_ci'][0] <= d[f'{key}_delta_ci'][1]
  assert 'paired over the same prompts' in (workdir / 'eval' /
                                            'results.md').read_text()
  lvrpo_metrics = [json.loads(line) for line in
                   (workdir / 'lvrpo' / 'metrics.jsonl').open()]
  first = lvrpo_metrics[0]
  for key in ('gen/r_ins/mean', 'gen/r_sem/std', 'gen/r_kn/mean',
              'und/answer_match/mean', 'gen/degenerate_groups',
              'und/entropy', 'time/rollout', 'time/reward', 'gen/kl_mean',
              'und/kl_mean', 'gen/clip_high_frac', 'und/ratio_max'):
    assert key in first, key
  assert first['gen/replay_gap'] < 1e-5 and first['und/replay_gap'] < 1e-5

  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('a photo of a red circle\ntwo squares\n')
  out = tmp_path / 'images'
  for stage in ('pretrain', 'lvrpo'):
    result = _run('lvrpo_jax.generate', f'--checkpoint={workdir / stage}',
                  f'--prompts={prompts}', f'--out={out / stage}',
                  '--num_per_prompt=2')
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(out / stage)) == ['0_0.png', '0_1.png',
                                               '1_0.png', '1_1.png']
    image = np.asarray(Image.open(out / stage / '1_1.png'))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8

  Image.fromarray(np.asarray(Image.open(out / 'lvrpo' / '0_0.png'))).save(
      tmp_path / 'x.png')
  questions = tmp_path / 'q.jsonl'
  questions.write_text(json.dumps({'image': 'x.png', 'question':
                                   'how many circles are there ?'}) + '\n')
  answers = tmp_path / 'a.jsonl'
  result = _run('lvrpo_jax.answer', f'--checkpoint={workdir / "lvrpo"}',
                f'--questions={questions}', f'--out={answers}')
  assert result.returncode == 0, result.stderr[-3000:]
  line = json.loads(answers.read_text())
  assert line['image'] == 'x.png' and isinstance(line['answer'], str)

  result = _run('lvrpo_jax.generate', f'--checkpoint={tmp_path / "nope"}',
                f'--prompts={prompts}', f'--out={out}')
  assert result.returncode == 1
  assert result.stderr.count('\n') == 1 and 'nope' in result.stderr
