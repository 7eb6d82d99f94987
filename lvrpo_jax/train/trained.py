"""Trained unified models by stage directory: what the inference CLIs load.

    config, model, autoencoder = trained.load('runs/default/lvrpo')

A stage directory (`<workdir>/<stage>`) holds the run's `config.json`
(written when the stage starts) and its checkpoints; the frozen autoencoder
is the `vae` stage beside it. Any stage with a unified model loads:
`pretrain` (the baseline), `sft_continue` and `lvrpo`.
"""

import importlib
import json
import os

import ml_collections

from lvrpo_jax import configs
from lvrpo_jax.train import autoencoder

# Stage -> 'module:function' returning its trained model, given
# (config, workdir, require_complete=True).
MODEL_STAGES = {
    'pretrain': 'lvrpo_jax.train.pretrain:train_baseline',
    'sft_continue': 'lvrpo_jax.train.pretrain:train_sft_continue',
    'lvrpo': 'lvrpo_jax.train.lvrpo:train_lvrpo',
}


# Keys added after stage directories may have been written: key -> its
# value for a config that predates it (what that config behaved as).
_ADDED_KEYS = {
    'model.dtype': lambda config: 'float32',
    'model.scan_layers': lambda config: False,
    'model.remat': lambda config: False,
    'model.remat_policy': lambda config: 'full',
    'compile_cache_dir': lambda config: '',
    'lvrpo.und_oversample': lambda config: 1,
    'lvrpo.gen_oversample': lambda config: 1,
    'lvrpo.gen_tags': lambda config: (),
    'lvrpo.und_generated': lambda config: 0.0,
    'lvrpo.und_generated_novel': lambda config: False,
    'lvrpo.und_generated_paste': lambda config: False,
    'lvrpo.und_paste_contrast': lambda config: 0.0,
    'lvrpo.guidance_interval': lambda config: (0.0, 1.0),
    'lvrpo.guidance_renorm': lambda config: False,
    'lvrpo.guidance_renorm_min': lambda config: 0.0,
    'lvrpo.train_transitions': lambda config: 0,
    'lvrpo.sde_window': lambda config: 0,
    'lvrpo.scale_by_mean': lambda config: (),
    'lvrpo.std_level': lambda config: 'group',
    'lvrpo.und_first_steps': lambda config: 0,
    'lvrpo.rewards.r_clean': lambda config: 0.0,
    'lvrpo.rewards.r_exact': lambda config: 0.0,
    'eval.vqa_examples': lambda config: config.eval.num_examples,
    'eval.heldout_examples': lambda config: config.eval.num_examples,
    'eval.splits': lambda config: ('test', 'heldout'),
    'world.num_val': lambda config: 0,
}


def _tuples(value):
  """JSON lists back to the tuples the config schema expects."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def read_config(stage_dir: str) -> ml_collections.ConfigDict:
  """The validated config a stage directory was trained with.

  Raises:
    FileNotFoundError: naming the directory, if it has no config.json.
  """
  path = os.path.join(stage_dir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{stage_dir} is not a stage directory (no config.json); pass '
        f'<workdir>/<stage> with stage one of {", ".join(MODEL_STAGES)}')
  with open(path) as f:
    config = ml_collections.ConfigDict(_tuples(json.load(f)))
  for key, value in _ADDED_KEYS.items():
    *sections, name = key.split('.')
    parent = config
    for section in sections:
      parent = parent[section]
    if name not in parent:
      parent[name] = value(config)
  configs.validate(config)
  return config


def model_of(stage: str, config, workdir: str):
  """The complete `stage`'s unified model in `workdir`."""
  module, function = MODEL_STAGES[stage].split(':')
  train = getattr(importlib.import_module(module), function)
  return train(config, workdir, require_complete=True)


def load(stage_dir: str):
  """(config, unified model, autoencoder) of a complete stage directory.

  Raises:
    FileNotFoundError: the directory, its config or a needed checkpoint is
      missing (the message names it).
    ValueError: the stage has no unified model.
  """
  stage_dir = os.path.normpath(stage_dir)
  name = os.path.basename(stage_dir)
  if name not in MODEL_STAGES:
    raise ValueError(f'{stage_dir}: stage {name!r} has no unified model; '
                     f'use one of {", ".join(MODEL_STAGES)}')
  config = read_config(stage_dir)
  workdir = os.path.dirname(stage_dir)
  model = model_of(name, config, workdir)
  ae = autoencoder.train_autoencoder(config, workdir, require_complete=True)
  return config, model, ae
