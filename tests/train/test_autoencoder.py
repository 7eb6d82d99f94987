"""The `vae` stage end to end through the CLI: trains, evaluates with the
world's detector, and is skipped when complete."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvrpo_jax.models import vae as vae_lib
from lvrpo_jax.train import autoencoder

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _main(workdir, *extra):
  return subprocess.run(
      [sys.executable, '-m', 'lvrpo_jax.main',
       '--config=configs/base.py:world_preview', f'--workdir={workdir}',
       "--config.stages=('world', 'vae')", '--config.world.num_train=256',
       '--config.world.num_test=64', '--config.world.num_heldout=16',
       '--config.world.num_val=0',
       '--config.vae.steps=30', '--config.vae.batch_size=16',
       '--config.vae.eval_examples=64', '--config.train.log_every=10',
       '--config.train.checkpoint_every=10', *extra],
      cwd=_ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_vae_stage_trains_evaluates_and_skips_when_complete(tmp_path):
  first = _main(tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  results = json.loads((tmp_path / 'vae' / 'eval.json').read_text())
  assert results['images'] == 64
  assert 0.0 <= results['detector_exact'] <= 1.0
  log = [json.loads(line) for line in
         (tmp_path / 'vae' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in log] == [1, 10, 20, 30]
  assert log[-1]['loss'] < log[0]['loss']
  assert (tmp_path / 'vae' / 'images' / 'reconstructions_30.png').exists()
  second = _main(tmp_path)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'vae: complete at step 30; skipped' in second.stdout


def test_vae_loss_by_its_formula():
  # Recomputed from the definition with the same draw: per image,
  # MSE(decode(mean + std * eps), x) + w * mean KL(N(mean, std) || N(0, 1)).
  model = vae_lib.LightAutoencoder(vae_lib.tiny(), rngs=nnx.Rngs(0))
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3),
                                             dtype=np.uint8)
  pixels = vae_lib.from_uint8(images)
  mean, logvar = model.encode(pixels)
  total, (count, aux) = autoencoder.vae_loss(
      model, {'image': jnp.asarray(images)}, jax.random.key(0),
      kl_weight=0.5, latent_noise=0.0)
  eps = jax.random.normal(jax.random.split(jax.random.key(0))[0], mean.shape)
  z = mean + jnp.exp(0.5 * logvar) * eps
  mse = ((model.decode(z) - pixels) ** 2).mean(axis=(1, 2, 3))
  kl = 0.5 * (mean ** 2 + jnp.exp(logvar) - 1 - logvar).mean(axis=(1, 2, 3))
  assert float(total) == pytest.approx(float((mse + 0.5 * kl).sum()),
                                       rel=1e-5)
  assert float(count) == 2
  assert float(aux['kl']) == pytest.approx(float(kl.mean()), rel=1e-5)


def test_evaluation_over_several_batches():
  # A perfect autoencoder stand-in: every reconstruction is exact.
  class Identity(nnx.Module):
    def encode(self, pixels):
      return pixels, pixels

    def decode(self, latents):
      return latents

  from lvrpo_jax.world import robustness, scene  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  records = [{'image': scene.render(robustness.random_scene(rng, 32, 'grid'))}
             for _ in range(10)]
  result = autoencoder.evaluate(Identity(), records, num=10, batch=4)
  assert result['images'] == 10 and result['detector_exact'] == 1.0
  # Originals over reconstructions from the first batch (4 images here).
  assert result['grid'].shape == (2 * 32 * 4, 4 * 32 * 4, 3)
