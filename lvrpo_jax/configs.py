"""Config validation, the stage table and derived values.

`validate(config)` checks every key against one schema table of
(key path, type, check) and raises `ConfigError` for the first problem, so a
bad config fails before any work with a message that names the key:

  config error: world.image_size: must be one of 32, 64, 128, 256, got 48

Keys the table does not know are errors too: a misspelt key in a config file
would otherwise be silently ignored. A new config key is added to the config
file and to `_SCHEMA` together.

`STAGES` maps each built stage name (a value of `config.stages`) to the
'module:function' that runs it as `fn(config, workdir) -> None`;
"""

import difflib
import os
from collections.abc import Callable
from typing import Any

import ml_collections

# Stage name -> 'module:function', imported by main only when the stage runs,
# so a stage's dependencies cost nothing to the others.
STAGES = {
    'world': 'lvrpo_jax.world.stage:run_world',
    'world_preview': 'lvrpo_jax.world.stage:run_world_preview',
    'vae': 'lvrpo_jax.train.autoencoder:run_vae',
    'reward_model': 'lvrpo_jax.train.reward_model:run_reward_model',
    'pretrain': 'lvrpo_jax.train.pretrain:run_pretrain',
    'sft_continue': 'lvrpo_jax.train.pretrain:run_sft_continue',
    'lvrpo': 'lvrpo_jax.train.lvrpo:run_lvrpo',
    'eval': 'lvrpo_jax.train.evaluate:run_eval',
}


# A check returns the reason a (well-typed) value is wrong, or None.
Check = Callable[[Any], str | None]


class ConfigError(ValueError):
  """A config value that cannot be run, with the key that holds it.

  Attributes:
    key: dotted path of the key, e.g. 'world.image_size'.
    reason: what is wrong with its value.
  """

  def __init__(self, key: str, reason: str):
    super().__init__(f'config error: {key}: {reason}')
    self.key = key
    self.reason = reason


def _join(values) -> str:
  return ', '.join(str(v) for v in values)


def _at_least(low: int) -> Check:
  return lambda v: None if v >= low else f'must be >= {low}, got {v}'


def _in_range(low: int, high: int) -> Check:
  return lambda v: (None if low <= v <= high
                    else f'must be in [{low}, {high}], got {v}')


def _positive(v) -> str | None:
  return None if v > 0 else f'must be > 0, got {v}'


def _non_negative(v) -> str | None:
  return None if v >= 0 else f'must be >= 0, got {v}'


def _among_once(what: str, allowed, empty: bool = True) -> Check:
  """A tuple naming values of `allowed()` (a callable: the world's modules
  import this one, so their tables are read when a config is checked),
  each at most once; `empty` allows naming none."""
  def check(values):
    names = tuple(allowed())
    if ((values or empty) and set(values) <= set(names)
        and len(set(values)) == len(values)):
      return None
    return f'must name {what} among {names} once each, got {values}'
  return check


def _geneval_tags():
  from lvrpo_jax.world import spec  # pylint: disable=import-outside-toplevel
  return spec.TAGS


def _eval_splits():
  # The world's splits but train.
  from lvrpo_jax.world import examples  # pylint: disable=import-outside-toplevel
  return [s for s in examples.SPLITS if s != 'train']


def _one_of(*allowed) -> Check:
  return lambda v: (None if v in allowed
                    else f'must be one of {_join(allowed)}, got {v!r}')


def _check_stages(stages: tuple[str, ...]) -> str | None:
  known = tuple(STAGES)
  if not stages:
    return 'must name at least one stage'
  for i, stage in enumerate(stages):
    if stage not in known:
      return f'unknown stage {stage!r} (known: {_join(known)})'
    if stage in stages[:i]:
      return f'stage {stage!r} is listed twice'
  return None


def _check_heldout(argument: str) -> Check:
  """Checks held-out compositions with the world's own parser."""
  from lvrpo_jax.world.examples import Compositions

  def check(value):
    try:
      Compositions.parse(**{argument: value,
                            ('relations' if argument == 'pairs' else 'pairs'):
                            ()})
    except ValueError as e:
      return str(e)
    return None
  return check


# (key path, type, check or None). `tuple[str, ...]` means a tuple of str.
_SCHEMA: tuple[tuple[str, Any, Check | None], ...] = (
    ('seed', int, _at_least(0)),
    ('stages', tuple[str, ...], _check_stages),
    ('compile_cache_dir', str, None),
    ('world.image_size', int, _one_of(32, 64, 128, 256)),
    ('world.layout', str, _one_of('grid', 'free')),
    ('world.max_objects', int, _in_range(1, 4)),
    ('world.num_train', int, _at_least(1)),
    ('world.num_test', int, _at_least(1)),
    ('world.num_heldout', int, _at_least(1)),
    ('world.num_val', int, _at_least(0)),
    ('world.heldout_pairs', tuple[str, ...], _check_heldout('pairs')),
    ('world.heldout_relations', tuple[str, ...],
     _check_heldout('relations')),
    ('world.train_relation_first', float, _in_range(0.0, 1.0)),
    ('world.data_dir', str, None),
    ('world.preview_examples', int, _at_least(1)),
    ('data.batch_size', int, _at_least(1)),
    ('data.shuffle_seed', int, _at_least(0)),
    ('data.worker_count', int, _at_least(0)),
    ('data.answer_rationale', bool, None),
    ('model.preset', str, _one_of('tiny', 'bagel_7b')),
    ('model.dtype', str, _one_of('float32', 'bfloat16')),
    ('model.scan_layers', bool, None),
    ('model.remat', bool, None),
    # models/transformer.REMAT_POLICIES (a test keeps the two equal).
    ('model.remat_policy', str, _one_of('full', 'dots', 'qkv',
                                        'qkv_attention')),
    ('mesh.data', int, lambda v: None if v == -1 or v >= 1 else
     f'must be -1 (all remaining devices) or >= 1, got {v}'),
    ('mesh.fsdp', int, _at_least(1)),
    ('mesh.tensor', int, _at_least(1)),
    ('train.log_every', int, _at_least(1)),
    ('train.checkpoint_every', int, _at_least(1)),
    ('train.keep_checkpoints', int, _at_least(1)),
    ('train.max_bad_steps', int, _at_least(1)),
    ('vae.steps', int, _at_least(1)),
    ('vae.batch_size', int, _at_least(1)),
    ('vae.accum_steps', int, _at_least(1)),
    ('vae.learning_rate', float, _positive),
    ('vae.warmup_steps', int, _at_least(0)),
    ('vae.kl_weight', float, _non_negative),
    ('vae.latent_noise', float, _non_negative),
    ('vae.eval_examples', int, _at_least(1)),
    ('reward_model.steps', int, _at_least(1)),
    ('reward_model.batch_size', int, _at_least(2)),
    ('reward_model.accum_steps', int, _at_least(1)),
    ('reward_model.learning_rate', float, _positive),
    ('reward_model.warmup_steps', int, _at_least(0)),
    ('reward_model.weight_decay', float, _non_negative),
    ('reward_model.eval_examples', int, _at_least(1)),
    ('reward_model.eval_candidates', int, _at_least(2)),
    ('pretrain.steps', int, _at_least(1)),
    ('pretrain.batch_size', int, _at_least(1)),
    ('pretrain.accum_steps', int, _at_least(1)),
    ('pretrain.learning_rate', float, _positive),
    ('pretrain.warmup_steps', int, _at_least(0)),
    ('pretrain.weight_decay', float, _non_negative),
    ('pretrain.flow_weight', float, _non_negative),
    ('pretrain.prompt_dropout', float, lambda v: None if 0 <= v < 1 else
     f'must be in [0, 1), got {v}'),
    ('sft_continue.steps', int, _at_least(1)),
    ('sft_continue.batch_size', int, _at_least(1)),
    ('sft_continue.accum_steps', int, _at_least(1)),
    ('sft_continue.learning_rate', float, _positive),
    ('sft_continue.warmup_steps', int, _at_least(0)),
    ('sft_continue.weight_decay', float, _non_negative),
    ('lvrpo.steps', int, _at_least(1)),
    ('lvrpo.group_size', int, _at_least(2)),
    ('lvrpo.gen_batch_size', int, _at_least(0)),
    ('lvrpo.und_batch_size', int, _at_least(0)),
    ('lvrpo.und_oversample', int, _at_least(1)),
    ('lvrpo.gen_oversample', int, _at_least(1)),
    ('lvrpo.und_generated', float, lambda v: None if 0 <= v <= 1 else
     f'must be in [0, 1], got {v}'),
    ('lvrpo.und_generated_novel', bool, None),
    ('lvrpo.und_generated_paste', bool, None),
    ('lvrpo.und_paste_contrast', float, lambda v: None if 0 <= v <= 1 else
     f'must be in [0, 1], got {v}'),
    ('lvrpo.gen_tags', tuple[str, ...],
     _among_once('GenEval tags', _geneval_tags)),
    ('lvrpo.heldout_fraction', float, lambda v: None if 0 <= v <= 1 else
     f'must be in [0, 1], got {v}'),
    ('lvrpo.num_updates', int, _at_least(1)),
    ('lvrpo.learning_rate', float, _positive),
    ('lvrpo.warmup_steps', int, _at_least(0)),
    ('lvrpo.weight_decay', float, _non_negative),
    ('lvrpo.clip_eps_low', float, lambda v: None if 0 <= v < 1 else
     f'must be in [0, 1), got {v}'),
    ('lvrpo.clip_eps_high', float, _non_negative),
    ('lvrpo.kl_coef', float, _non_negative),
    ('lvrpo.kl_estimator', str, _one_of('k1', 'k2', 'k3')),
    ('lvrpo.loss_agg', str, _one_of('grpo', 'bnpo', 'dapo', 'dr_grpo')),
    ('lvrpo.importance_level', str, _one_of('token', 'sequence')),
    ('lvrpo.scale_by_std', bool, None),
    ('lvrpo.std_level', str, _one_of('group', 'batch')),
    ('lvrpo.scale_by_mean', tuple[str, ...],
     _among_once('tasks', lambda: ('und', 'gen'))),
    ('lvrpo.reward_norm', str, _one_of('sum', 'per_component')),
    ('lvrpo.reward_errors', str, _one_of('raise', 'zero')),
    ('lvrpo.sample_steps', int, _at_least(1)),
    ('lvrpo.train_transitions', int, _at_least(0)),
    ('lvrpo.sde_window', int, _at_least(0)),
    ('lvrpo.noise_level', float, _positive),
    ('lvrpo.cfg_mode', str, _one_of('none', 'guided', 'cond_only')),
    ('lvrpo.guidance', float, _at_least(0)),
    ('lvrpo.guidance_interval', tuple[float, ...], lambda v: None if (
        len(v) == 2 and 0 <= v[0] < v[1] <= 1) else
     f'must be (low, high) with 0 <= low < high <= 1, got {v}'),
    ('lvrpo.guidance_renorm', bool, None),
    ('lvrpo.guidance_renorm_min', float, lambda v: None if 0 <= v <= 1 else
     f'must be in [0, 1], got {v}'),
    ('lvrpo.temperature', float, _positive),
    ('lvrpo.understanding_weight', float, _non_negative),
    ('lvrpo.gen_context_grad', bool, None),
    ('lvrpo.und_first_steps', int, _at_least(0)),
    ('lvrpo.pretrain_batch_size', int, _at_least(0)),
    ('lvrpo.pretrain_weight', float, _non_negative),
    ('lvrpo.rewards.r_sem', float, _non_negative),
    ('lvrpo.rewards.r_dense', float, _non_negative),
    ('lvrpo.rewards.r_ins', float, _non_negative),
    ('lvrpo.rewards.r_ins_partial', float, _non_negative),
    ('lvrpo.rewards.r_clean', float, _non_negative),
    ('lvrpo.rewards.r_exact', float, _non_negative),
    ('lvrpo.rewards.r_kn', float, _non_negative),
    ('lvrpo.rewards.answer_match', float, _non_negative),
    ('lvrpo.rewards.format', float, _non_negative),
    ('eval.splits', tuple[str, ...],
     _among_once('splits', _eval_splits, empty=False)),
    ('eval.num_examples', int, _at_least(1)),
    ('eval.heldout_examples', int, _at_least(1)),
    ('eval.vqa_examples', int, _at_least(1)),
    ('eval.batch_size', int, _at_least(1)),
    ('eval.sample_steps', int, _at_least(1)),
    ('eval.guidance', float, _at_least(0)),
)


# Pairs of keys whose values must be strictly ordered.
_LESS_THAN = (
    ('vae.warmup_steps', 'vae.steps'),
    ('reward_model.warmup_steps', 'reward_model.steps'),
    ('pretrain.warmup_steps', 'pretrain.steps'),
    ('sft_continue.warmup_steps', 'sft_continue.steps'),
    ('lvrpo.warmup_steps', 'lvrpo.steps'),
)


def _type_error(value: Any, expected: Any) -> str | None:
  """Returns why `value` is not of the schema type `expected`, or None."""
  if expected is int:
    # bool is an int subclass, but True is no image size.
    if isinstance(value, int) and not isinstance(value, bool):
      return None
    return f'must be int, got {type(value).__name__} {value!r}'
  if expected is float:
    # An int where a float is expected is fine (1 for 1.0); a bool is not.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return None
    return f'must be float, got {type(value).__name__} {value!r}'
  if expected is bool:
    return None if isinstance(value, bool) else (
        f'must be bool, got {type(value).__name__} {value!r}')
  if expected is str:
    return None if isinstance(value, str) else (
        f'must be str, got {type(value).__name__} {value!r}')
  # tuple[str, ...] or tuple[float, ...]
  item_type = expected.__args__[0]
  if not isinstance(value, tuple):
    return (f'must be a tuple of {item_type.__name__}, got '
            f'{type(value).__name__} {value!r}')
  for item in value:
    if _type_error(item, item_type) is not None:
      return (f'must be a tuple of {item_type.__name__}, got element '
              f'{item!r}')
  return None


def _leaf_keys(config: ml_collections.ConfigDict, prefix: str = ''):
  """Yields the dotted path of every non-ConfigDict value in `config`."""
  for name, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict,
                          ml_collections.FrozenConfigDict)):
      yield from _leaf_keys(value, f'{prefix}{name}.')
    else:
      yield f'{prefix}{name}'


def _lookup(config: ml_collections.ConfigDict, key: str) -> tuple[bool, Any]:
  """Returns (found, value) of a dotted key."""
  node = config
  for name in key.split('.'):
    if not hasattr(node, 'keys') or name not in node:
      return False, None
    node = node[name]
  return True, node


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every key of `config` against the schema.

  Args:
    config: a config as returned by `configs/base.py:get_config`, after
      command-line overrides.

  Raises:
    ConfigError: for the first missing, unknown, ill-typed or out-of-range
      key, in schema order.
  """
  for key, expected, check in _SCHEMA:
    found, value = _lookup(config, key)
    if not found:
      raise ConfigError(key, 'missing')
    reason = _type_error(value, expected) or (check and check(value))
    if reason:
      raise ConfigError(key, reason)
  for smaller, larger in _LESS_THAN:
    if _lookup(config, smaller)[1] >= _lookup(config, larger)[1]:
      raise ConfigError(smaller, f'must be < {larger} = '
                        f'{_lookup(config, larger)[1]}, got '
                        f'{_lookup(config, smaller)[1]}')
  if config.model.remat_policy != 'full' and not config.model.remat:
    raise ConfigError('model.remat_policy', f'{config.model.remat_policy!r} '
                      'applies only with model.remat True')
  _check_lvrpo(config)
  if 'val' in config.eval.splits and not config.world.num_val:
    raise ConfigError('eval.splits', "scores 'val', but world.num_val is 0")
  known = [key for key, _, _ in _SCHEMA]
  for key in _leaf_keys(config):
    if key not in known:
      close = difflib.get_close_matches(key, known, n=1)
      hint = f'; did you mean {close[0]}?' if close else ''
      raise ConfigError(key, f'unknown key{hint}')


def _check_lvrpo(config) -> None:
  """Cross-key checks of the lvrpo section, before anything compiles."""
  c = config.lvrpo
  for key in ('gen_batch_size', 'und_batch_size'):
    if c[key] % c.group_size:
      raise ConfigError(f'lvrpo.{key}', f'{c[key]} samples do not split '
                        f'into groups of lvrpo.group_size={c.group_size}')
  if c.gen_batch_size + c.und_batch_size == 0:
    raise ConfigError('lvrpo.gen_batch_size',
                      'and lvrpo.und_batch_size are both 0')
  if c.und_first_steps and not (c.und_first_steps < c.steps
                                and c.gen_batch_size and c.und_batch_size):
    raise ConfigError('lvrpo.und_first_steps', f'{c.und_first_steps} steps '
                      'of answers, then images: needs fewer than lvrpo.steps='
                      f'{c.steps} and both lvrpo.gen_batch_size and '
                      'lvrpo.und_batch_size > 0')
  if c.und_generated > 0 and not (c.gen_batch_size and c.und_batch_size):
    raise ConfigError('lvrpo.und_generated', 'asks about the step\'s '
                      'generated images: needs lvrpo.gen_batch_size and '
                      'lvrpo.und_batch_size both > 0')
  if c.cfg_mode == 'guided' or c.guidance != 1.0:
    # Guidance needs the unconditional model that prompt dropout trains.
    if config.pretrain.prompt_dropout == 0:
      raise ConfigError('lvrpo.cfg_mode', f'{c.cfg_mode!r} with guidance '
                        f'{c.guidance} needs an unconditional model, but '
                        'pretrain.prompt_dropout is 0')
    if c.cfg_mode != 'guided':
      raise ConfigError('lvrpo.guidance', f'must be 1 unless cfg_mode is '
                        f"'guided' (it is {c.cfg_mode!r}), got {c.guidance}")
  if c.cfg_mode != 'guided':
    if tuple(c.guidance_interval) != (0.0, 1.0):
      raise ConfigError('lvrpo.guidance_interval', 'applies to cfg_mode '
                        f"'guided' only (it is {c.cfg_mode!r})")
    if c.guidance_renorm:
      raise ConfigError('lvrpo.guidance_renorm', 'applies to cfg_mode '
                        f"'guided' only (it is {c.cfg_mode!r})")
  if c.sde_window > c.sample_steps:
    raise ConfigError('lvrpo.sde_window', f'{c.sde_window} of '
                      f'lvrpo.sample_steps={c.sample_steps} transitions')
  if c.train_transitions > c.sample_steps:
    raise ConfigError('lvrpo.train_transitions', f'{c.train_transitions} of '
                      f'lvrpo.sample_steps={c.sample_steps} transitions')
  if 0 < c.sde_window < c.train_transitions:
    raise ConfigError('lvrpo.train_transitions', f'{c.train_transitions} of '
                      f'the lvrpo.sde_window={c.sde_window} SDE transitions')
  if config.eval.guidance != 1.0 and config.pretrain.prompt_dropout == 0:
    raise ConfigError('eval.guidance', 'needs an unconditional model, but '
                      'pretrain.prompt_dropout is 0')


def world_data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Returns where the shapes world dataset lives.

  Args:
    config: a validated config.
    workdir: the run's work directory.

  Returns:
    `config.world.data_dir`, or `<workdir>/world/data` when it is ''.
  """
  return config.world.data_dir or os.path.join(workdir, 'world', 'data')
