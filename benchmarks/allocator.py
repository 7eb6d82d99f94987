r"""The host allocator under XLA:CPU: glibc's malloc against mimalloc.

  python benchmarks/allocator.py [--out=benchmarks/results/allocator.json]

Runs `benchmarks/train.py` for the pretrain and autoencoder steps twice,
side by side: once with LVRPO_JAX_ALLOCATOR=system (glibc), once under the
mimalloc that `lvrpo_jax.allocator` preloads, and writes both step times,
their CPU time per step (user, system) and the glibc / mimalloc step-time
ratio (> 1: mimalloc faster).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import report
from lvrpo_jax import allocator

_CASES = ('vae', 'pretrain')


def run(choice: str, steps: int, out_dir: str) -> dict:
  """benchmarks/train.py's results under `choice` ('system' or
  'mimalloc')."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('LD_PRELOAD', allocator.ENV)}
  if choice == 'system':
    env[allocator.ENV] = 'system'
  out = os.path.join(out_dir, f'{choice}.json')
  subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__),
                                               'train.py'),
                  f'--out={out}', f'--steps={steps}',
                  f'--cases={",".join(_CASES)}'], env=env, check=True)
  with open(out) as f:
    return json.load(f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='benchmarks/results/allocator.json')
  parser.add_argument('--steps', type=int, default=20)
  args = parser.parse_args()
  if allocator.mimalloc_library() is None or sys.platform != 'linux':
    sys.exit('needs Linux and the cmeel-mimalloc wheel (requirements.txt)')
  with tempfile.TemporaryDirectory() as tmp:
    runs = {choice: run(choice, args.steps, tmp)
            for choice in ('system', 'mimalloc')}
  for choice, result in runs.items():
    if result['machine']['host_allocator'] != choice:
      sys.exit(f'the {choice} run reported '
               f"{result['machine']['host_allocator']}")
  keys = ('step_time_s', 'user_cpu_s_per_step', 'system_cpu_s_per_step')
  machine = {k: v for k, v in runs['system']['machine'].items()
             if k != 'host_allocator'}
  results = {'machine': machine, 'model': 'tiny',
             'steps': args.steps}
  for case in _CASES:
    results[case] = {choice: {k: runs[choice][case][k] for k in keys}
                     for choice in runs}
    results[case]['speedup'] = (runs['system'][case]['step_time_s'] /
                                runs['mimalloc'][case]['step_time_s'])
    print(f"{case}: {results[case]['speedup']:.2f}x with mimalloc",
          flush=True)
  report.write(results, args.out)


if __name__ == '__main__':
  main()
