"""What every benchmark script records: the machine, and the JSON file."""

import json
import os
import platform

import jax


def machine(**extra) -> dict:
  """Cores, Python, processor, jax and its first device's kind (e.g. 'cpu',
  'NVIDIA H100 80GB HBM3'), plus what the caller adds (backend...)."""
  return {'cpus': os.cpu_count(), 'python': platform.python_version(),
          'processor': platform.processor() or platform.machine(),
          'jax': jax.__version__, 'device_kind': jax.devices()[0].device_kind,
          'host_allocator': os.environ.get('LVRPO_JAX_ALLOCATOR', 'system'),
          **extra}


def write(results: dict, path: str) -> None:
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'wrote {path}')
