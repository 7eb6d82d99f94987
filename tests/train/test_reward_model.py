"""The `reward_model` stage: duplicate captions are positives, sources
concatenate, ranking gives ties no credit, and the stage runs end to end."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvrpo_jax.models import dual_encoder as dual_lib
from lvrpo_jax.train import reward_model

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def test_identical_captions_are_positives_for_each_other():
  model = dual_lib.DualEncoder(dual_lib.tiny(), rngs=nnx.Rngs(0))
  ids = jnp.asarray([[8, 35, 15, 0], [8, 35, 15, 0], [8, 14, 38, 0]])
  images = jnp.zeros((3, 32, 32, 3), jnp.uint8)
  total, (count, aux) = reward_model.rm_loss(
      model, {'image': images, 'caption': ids}, None)
  # Rows 0 and 1 match both texts 0 and 1; row 2 only itself: 5 / 3.
  assert float(aux['positives_per_image']) == pytest.approx(5 / 3)
  assert float(count) == 3
  img = model.embed_image(jnp.zeros((3, 32, 32, 3)) - 1.0)
  txt = model.embed_text(ids)
  positives = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
  want = dual_lib.siglip_loss(img, txt, model.logit_scale[...],
                              model.logit_bias[...], jnp.asarray(positives))
  assert float(total) == pytest.approx(float(want) * 3, rel=1e-6)


def test_concatenated_sources_index_through():
  joined = reward_model.Concatenated([0, 1, 2], [10, 11])
  assert len(joined) == 5
  assert [joined[i] for i in range(5)] == [0, 1, 2, 10, 11]


class _Collapsed(nnx.Module):
  """Every image and text embeds to the same vector: all ties."""

  def embed_image(self, x):
    return jnp.ones((x.shape[0], 4)) / 2.0

  def embed_text(self, t):
    return jnp.ones((t.shape[0], 4)) / 2.0


def test_ties_earn_no_credit():
  records = [{'image': np.zeros((32, 32, 3), np.uint8),
              'caption': f'a {c} circle'.encode()}
             for c in ('red', 'blue', 'green', 'white')]
  result = reward_model.caption_ranking(_Collapsed(), records, 4, 3, 16, 0)
  assert result['top1'] == 0.0


@pytest.mark.slow  # The vae stage's end-to-end test covers the same path.
def test_stage_runs_end_to_end(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'lvrpo_jax.main',
       '--config=configs/base.py:world_preview', f'--workdir={tmp_path}',
       "--config.stages=('world', 'reward_model')",
       '--config.world.num_train=256', '--config.world.num_test=64',
       '--config.world.num_heldout=32', '--config.reward_model.steps=20',
       '--config.world.num_val=0',
       '--config.reward_model.batch_size=16',
       '--config.reward_model.warmup_steps=5',
       '--config.reward_model.eval_examples=64',
       '--config.train.log_every=10', '--config.train.checkpoint_every=10'],
      cwd=_ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / 'reward_model' / 'eval.json').read_text())
  assert results['images'] == 64 and results['candidates'] == 16
  assert 0.0 <= results['top1'] <= 1.0
  assert 'right caption ranked first' in result.stdout
