"""What every benchmark script shares: the default config, the machine it
ran on, and the JSON file."""

import importlib.util
import json
import os
import platform

import jax


_BASE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            os.pardir, 'configs', 'base.py')


def default_config():
  """configs/base.py's default config (loaded from the file, as tests do)."""
  spec = importlib.util.spec_from_file_location('base', _BASE_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


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
