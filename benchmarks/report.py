"""What every benchmark script records: the machine, and the JSON file."""

import json
import os
import platform


def machine(**extra) -> dict:
  """Cores, Python and processor, plus what the caller adds (backend...)."""
  return {'cpus': os.cpu_count(), 'python': platform.python_version(),
          'processor': platform.processor() or platform.machine(), **extra}


def write(results: dict, path: str) -> None:
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'wrote {path}')
