"""The `vae` stage: the latent autoencoder, trained on world images.

Loss per image: mean squared pixel error of the reconstruction from a
posterior sample, plus `kl_weight` x the mean KL to N(0, 1) per latent
element. Gaussian noise of std `latent_noise` is added to the sampled
latents, so the decoder tolerates the imperfect latents a flow model
produces (DESIGN §7).

Evaluated by the world's own detector: the share of test images whose
reconstruction (decoded from the posterior mean) is detected exactly as the
original — the objects, colours, shapes and boxes a generated image will be
judged by. Writes `workdir/vae/eval.json` and a grid of originals over
reconstructions.
"""

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvrpo_jax import configs
from lvrpo_jax import metrics as metrics_lib
from lvrpo_jax.data import pipeline
from lvrpo_jax.models import presets
from lvrpo_jax.models import vae as vae_lib
from lvrpo_jax.train import stages
from lvrpo_jax.world import stage as world_stage
from lvrpo_jax.world.detector import detect


class Images(grain.transforms.Map):
  """Keeps the uint8 image only (module level: worker processes pickle it)."""

  def map(self, record):
    return {'image': record['image']}


def vae_loss(model, batch, rng, *, kl_weight: float, latent_noise: float):
  """(sum over images of the per-image loss, (images, aux))."""
  pixels = vae_lib.from_uint8(batch['image'])
  mean, logvar = model.encode(pixels)
  sample_rng, noise_rng = jax.random.split(rng)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(sample_rng, mean.shape)
  z = z + latent_noise * jax.random.normal(noise_rng, z.shape)
  mse = ((model.decode(z) - pixels) ** 2).mean(axis=(1, 2, 3))
  kl = 0.5 * (mean ** 2 + jnp.exp(logvar) - 1.0 - logvar).mean(axis=(1, 2, 3))
  per_image = mse + kl_weight * kl
  return per_image.sum(), (jnp.asarray(pixels.shape[0], jnp.float32),
                           {'mse': mse.mean(), 'kl': kl.mean()})


def make_autoencoder(config):
  """The stage's model, from `config.model.preset` (always float32: the
  small conv autoencoder's latents are the flow's targets)."""
  _, ae_cfg = presets.PRESETS[config.model.preset]()
  cls = (vae_lib.LightAutoencoder
         if isinstance(ae_cfg, vae_lib.LightAutoencoderConfig)
         else vae_lib.AutoencoderKL)
  return lambda: cls(ae_cfg, rngs=nnx.Rngs(config.seed))


def train_autoencoder(config, workdir: str, require_complete: bool = False):
  """The stage's loop: trains, resumes or (when complete) just restores.

  With `require_complete`, a stage not trained to the end is an error (a
  later stage asking for the frozen autoencoder).
  """
  section = config.vae
  world, sizes = world_stage.world_and_sizes(config)
  train = pipeline.open_split(world, sizes,
                              configs.world_data_dir(config, workdir),
                              'train')
  return stages.run(
      'vae', config, workdir, make_model=make_autoencoder(config),
      loss_fn=lambda m, b, r: vae_loss(m, b, r, kl_weight=section.kl_weight,
                                       latent_noise=section.latent_noise),
      source=train, transform=Images(), tokens_per_step=section.batch_size,
      require_complete=require_complete)


def run_vae(config, workdir: str) -> None:
  """Trains the autoencoder (or resumes, or skips) and evaluates it."""
  section = config.vae
  world, sizes = world_stage.world_and_sizes(config)
  data_dir = configs.world_data_dir(config, workdir)
  model = train_autoencoder(config, workdir)
  test = pipeline.open_split(world, sizes, data_dir, 'test')
  results = evaluate(model, test, section.eval_examples)
  out = os.path.join(workdir, 'vae')
  with open(os.path.join(out, 'eval.json'), 'w') as f:
    json.dump({k: v for k, v in results.items() if k != 'grid'}, f, indent=2)
  with metrics_lib.MetricsWriter(out) as writer:
    writer.write_images(section.steps, {'reconstructions': results['grid']})
  print(f"  vae: {results['detector_exact']:.1%} of {results['images']} test "
        'reconstructions detected exactly as their originals', flush=True)


def evaluate(model, source, num: int, batch: int = 256) -> dict:
  """Detector-exact reconstruction rate and a grid of examples."""
  num = min(num, len(source))
  graphdef, state = nnx.split(model)

  @jax.jit
  def reconstruct(state, images):
    m = nnx.merge(graphdef, state)
    mean, _ = m.encode(vae_lib.from_uint8(images))
    return vae_lib.to_uint8(m.decode(mean))

  exact = 0
  for start in range(0, num, batch):
    images = np.stack([source[i]['image']
                       for i in range(start, min(start + batch, num))])
    out = np.asarray(reconstruct(state, images))
    for original, recon in zip(images, out):
      key = lambda d: sorted((x.color, x.shape, x.bbox) for x in d)
      exact += key(detect(original)) == key(detect(recon))
    if start == 0:
      originals, recons = images[:8], out[:8]
  grid = metrics_lib.image_grid(np.concatenate([originals, recons]),
                                columns=len(originals), scale=4)
  return {'images': num, 'detector_exact': exact / num, 'grid': grid}
