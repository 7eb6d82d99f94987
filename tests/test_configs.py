"""Tests of config validation (lvrpo_jax/configs.py) and configs/base.py."""

import importlib.util
import pathlib

import ml_collections
import pytest

from lvrpo_jax import configs

_BASE = pathlib.Path(__file__).parents[1] / 'configs' / 'base.py'


def _get_config(arg=None) -> ml_collections.ConfigDict:
  # configs/ is a folder of config files, not a package: load it by path, as
  # ml_collections' config flag does.
  spec = importlib.util.spec_from_file_location('base_config', _BASE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _with(key: str, value, remove: bool = False):
  """Returns the default config with `key` set to `value` (or removed).

  Built from a plain dict, because a ConfigDict refuses to change a field's
  type, and validation must catch configs built that way too.
  """
  tree = _get_config().to_dict()
  *parents, name = key.split('.')
  node = tree
  for parent in parents:
    node = node[parent]
  if remove:
    del node[name]
  else:
    node[name] = value
  return ml_collections.ConfigDict(tree)


def _error(config) -> configs.ConfigError:
  with pytest.raises(configs.ConfigError) as info:
    configs.validate(config)
  return info.value


@pytest.mark.parametrize('preset', [None, '', 'world_preview'])
def test_every_preset_validates(preset):
  configs.validate(_get_config(preset))


def test_presets():
  default, preview = _get_config(), _get_config('world_preview')
  assert default.stages == ('world', 'vae', 'reward_model', 'pretrain',
                            'sft_continue', 'lvrpo', 'eval')
  assert preview.stages == ('world', 'world_preview')
  assert (preview.world.num_train, preview.world.num_test,
          preview.world.num_heldout) == (2_000, 200, 200)


def test_unknown_preset_is_named():
  with pytest.raises(ValueError, match="unknown preset 'nope'"):
    _get_config('nope')


@pytest.mark.parametrize('key, value, reason', [
    ('seed', -1, 'must be >= 0, got -1'),
    ('seed', 1.5, 'must be int, got float 1.5'),
    ('stages', ['world'], "must be a tuple of str, got list ['world']"),
    ('stages', (), 'must name at least one stage'),
    ('stages', ('world', 'world'), "stage 'world' is listed twice"),
    ('world.image_size', 48, 'must be one of 32, 64, 128, 256, got 48'),
    ('world.image_size', '32', "must be int, got str '32'"),
    ('world.image_size', True, 'must be int, got bool True'),
    ('world.layout', 'ring', "must be one of grid, free, got 'ring'"),
    ('model.dtype', 'float16',
     "must be one of float32, bfloat16, got 'float16'"),
    ('world.max_objects', 0, 'must be in [1, 4], got 0'),
    ('world.max_objects', 5, 'must be in [1, 4], got 5'),
    ('world.num_train', 0, 'must be >= 1, got 0'),
    ('world.num_test', 0, 'must be >= 1, got 0'),
    ('world.num_heldout', 0, 'must be >= 1, got 0'),
    ('world.num_val', -1, 'must be >= 0, got -1'),
    ('eval.splits', (), "among ('test', 'heldout', 'val') once each, got ()"),
    ('eval.splits', ('test', 'train'), 'once each'),
    ('eval.splits', ('val', 'val'), 'once each'),
    ('world.heldout_pairs', ('red',), "'red' must be \"colour shape\""),
    ('world.heldout_pairs', ('pink circle',), "unknown colour 'pink'"),
    ('world.heldout_pairs', ('red star',), "unknown shape 'star'"),
    ('world.heldout_pairs', ('red circle', 3), 'got element 3'),
    ('world.heldout_relations', ('circle above',),
     "'circle above' must be \"shape relation shape\""),
    ('world.heldout_relations', ('star above circle',),
     "unknown shape 'star'"),
    ('world.heldout_relations', ('circle left of square',), 'must be'),
    ('world.heldout_relations', ('circle beside square',),
     "relation in ['left_of', 'right_of', 'above', 'below']"),
    ('world.heldout_relations', ('square below square',),
     'needs two shapes'),
    ('world.data_dir', None, 'must be str, got NoneType None'),
    ('world.preview_examples', 0, 'must be >= 1, got 0'),
    ('data.batch_size', 0, 'must be >= 1, got 0'),
    ('data.shuffle_seed', -1, 'must be >= 0, got -1'),
    ('data.worker_count', -1, 'must be >= 0, got -1'),
    ('lvrpo.guidance_interval', (0.5, 0.4), 'must be (low, high)'),
    ('lvrpo.guidance_interval', (0.0, 'x'), "got element 'x'"),
    ('lvrpo.guidance_renorm_min', 1.5, 'must be in [0, 1], got 1.5'),
    ('lvrpo.scale_by_mean', ('und', 'text'), "among ('und', 'gen')"),
    ('lvrpo.scale_by_mean', ('und', 'und'), 'once each'),
    # Defaults: cfg_mode 'none', where interval and renorm do not apply.
    ('lvrpo.guidance_interval', (0.4, 1.0), "'guided' only"),
    ('lvrpo.guidance_renorm', True, "'guided' only"),
    ('model.remat_policy', 'some', "must be one of full, dots, qkv"),
    # Default: remat False.
    ('model.remat_policy', 'dots', "applies only with model.remat True"),
])
def test_bad_value_is_rejected_with_its_key(key, value, reason):
  error = _error(_with(key, value))
  assert error.key == key
  assert reason in error.reason


def test_warmup_longer_than_training_is_rejected():
  error = _error(_with('vae.warmup_steps', 600))
  assert error.key == 'vae.warmup_steps'
  assert error.reason == 'must be < vae.steps = 600, got 600'


def test_val_split_scored_only_when_the_world_has_one():
  config = _with('eval.splits', ('val', 'test'))
  configs.validate(config)
  config.world.num_val = 0
  error = _error(config)
  assert (error.key, error.reason) == (
      'eval.splits', "scores 'val', but world.num_val is 0")


def test_unknown_stage_is_named_with_the_known_ones():
  error = _error(_with('stages', ('world', 'pretrian')))
  assert error.key == 'stages'
  assert error.reason == (
      "unknown stage 'pretrian' (known: world, world_preview, vae, "
      'reward_model, pretrain, sft_continue, lvrpo, eval)')


def test_missing_key_is_named():
  error = _error(_with('data.batch_size', None, remove=True))
  assert (error.key, error.reason) == ('data.batch_size', 'missing')


def test_unknown_key_is_named_with_a_suggestion():
  error = _error(_with('world.image_sze', 64))
  assert error.key == 'world.image_sze'
  assert error.reason == 'unknown key; did you mean world.image_size?'


def test_message_format():
  error = configs.ConfigError('world.layout', 'must be one of grid, free')
  assert isinstance(error, ValueError)
  assert str(error) == 'config error: world.layout: must be one of grid, free'


def test_every_stage_names_a_module_and_function():
  for target in configs.STAGES.values():
    module, function = target.split(':')
    assert module and function


def test_world_data_dir():
  assert configs.world_data_dir(_get_config(), 'runs/x') == 'runs/x/world/data'
  assert configs.world_data_dir(_with('world.data_dir', '/d'), 'runs/x') == '/d'


def test_remat_policies_are_the_models():
  from lvrpo_jax.models import transformer  # pylint: disable=import-outside-toplevel
  check = dict((k, c) for k, _, c in configs._SCHEMA)['model.remat_policy']  # pylint: disable=protected-access
  for name in transformer.REMAT_POLICIES:
    assert check(name) is None
  # The message lists the schema's names: exactly the model's.
  assert check('none') == ('must be one of ' + ', '.join(
      transformer.REMAT_POLICIES) + ", got 'none'")
