r"""Shapes-world benchmark: detector speed and accuracy, dataset build time.

  python benchmarks/world.py [--out=benchmarks/results/world.json] [--quick]

Writes JSON with
  build:     seconds to build a fresh 50k-train (+2k test, +2k held-out)
             TFDS dataset with all cores (target < 60 s on 2 cores);
  speed:     scenes rendered + detected per second on one core at 32x32
             (target >= 2,000/s), and render / detect alone;
  accuracy:  detector object-level accuracy on 10,000 clean scenes (target
             >= 99.9 %) and 10,000 with a 3x3 blur plus noise sigma = 16/255
             (target >= 95 %).
Takes about a minute on 2 cores (--quick: a tenth of the work).
"""

import os

# One BLAS thread: the speed figure is per core. Must precede numpy's import.
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import tempfile
import time

import numpy as np

import report
from lvrpo_jax import world
from lvrpo_jax.world import dataset
from lvrpo_jax.world import examples
from lvrpo_jax.world import robustness
from lvrpo_jax.world import scene as scene_lib

_HELDOUT = examples.Compositions.parse(
    ('purple circle', 'orange square', 'cyan triangle'),
    ('triangle above circle', 'circle left_of square'))


def bench_build(num_train: int) -> dict:
  sizes = {'train': num_train, 'test': 2_000, 'heldout': 2_000, 'val': 2_000}
  processes = os.cpu_count() or 1
  with tempfile.TemporaryDirectory() as data_dir:
    start = time.perf_counter()
    dataset.build(examples.WorldSpec(heldout=_HELDOUT), sizes, data_dir,
                  processes=processes)
    seconds = time.perf_counter() - start
  total = sum(sizes.values())
  return {'examples': total, 'sizes': sizes, 'processes': processes,
          'seconds': seconds, 'examples_per_s': total / seconds}


def bench_speed(num_scenes: int) -> dict:
  # Pin to one core so the figure is per core whatever else runs.
  if hasattr(os, 'sched_setaffinity'):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  rng = np.random.default_rng(0)
  scenes = [robustness.random_scene(rng, 32, 'grid')
            for _ in range(num_scenes)]
  world.detect(scene_lib.render(scenes[0]))  # Warm the caches.
  start = time.perf_counter()
  images = [scene_lib.render(s) for s in scenes]
  render_s = time.perf_counter() - start
  start = time.perf_counter()
  for image in images:
    world.detect(image)
  detect_s = time.perf_counter() - start
  start = time.perf_counter()
  for s in scenes:
    world.detect(scene_lib.render(s))
  both_s = time.perf_counter() - start
  return {'scenes': num_scenes, 'image_size': 32, 'layout': 'grid',
          'render_per_s': num_scenes / render_s,
          'detect_per_s': num_scenes / detect_s,
          'render_and_detect_per_s': num_scenes / both_s,
          'target_render_and_detect_per_s': 2_000}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='benchmarks/results/world.json')
  parser.add_argument('--quick', action='store_true',
                      help='a tenth of the scenes and examples')
  args = parser.parse_args()
  scale = 10 if args.quick else 1
  results = {'machine': report.machine(),
             'quick': args.quick}
  print('building the dataset ...', flush=True)
  results['build'] = bench_build(50_000 // scale)
  results['build']['target_seconds'] = 60
  print(f"  {results['build']['seconds']:.1f} s", flush=True)
  print('detector accuracy ...', flush=True)
  results['accuracy'] = {
      'clean': robustness.detector_accuracy(10_000 // scale, seed=1),
      'blur3_noise16': robustness.detector_accuracy(10_000 // scale,
                                                    corrupt=True, seed=2),
      'targets': {'clean': 0.999, 'blur3_noise16': 0.95}}
  for name in ('clean', 'blur3_noise16'):
    print(f"  {name}: {results['accuracy'][name]['scene_exact']:.4%}",
          flush=True)
  print('speed on one core ...', flush=True)
  results['speed'] = bench_speed(20_000 // scale)
  print(f"  {results['speed']['render_and_detect_per_s']:.0f} scenes/s",
        flush=True)
  report.write(results, args.out)


if __name__ == '__main__':
  main()
