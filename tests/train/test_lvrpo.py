"""The lvrpo stage: the update replays the rollout, traces once, and equals
single-device training when sharded; its prompt sources and config checks."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from lvrpo_jax import configs
from lvrpo_jax import sharding
from lvrpo_jax.models import presets
from lvrpo_jax.models import unified
from lvrpo_jax.rl import rollout
from lvrpo_jax.train import lvrpo
from lvrpo_jax.train import lvrpo_groups
from lvrpo_jax.train import lvrpo_prompts
from lvrpo_jax.train import lvrpo_schedule
from lvrpo_jax.train import pretrain
from lvrpo_jax.train import step as step_lib
from lvrpo_jax.world import questions as questions_lib
from lvrpo_jax.world import spec as spec_lib
from lvrpo_jax.world import tokenizer as tok

def _config(**overrides) -> ml_collections.ConfigDict:
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location('base', 'configs/base.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    config.lvrpo[key] = value
  return config


def _make():
  return unified.UnifiedModel(presets.micro(), rngs=nnx.Rngs(0))


def _update_batch(model, c, prompts: int = 4, seed: int = 0):
  """A real rollout of both tasks by `model`, as the update's batch; the
  reference is `model` too and the advantages are random."""
  rng = np.random.default_rng(seed)
  g = c.group_size
  images = rng.integers(0, 256, (prompts, 32, 32, 3), dtype=np.uint8)
  questions = jnp.asarray(rng.integers(len(tok.SPECIALS), 51,
                                       (prompts, 6)), jnp.int32)
  prompt = jnp.asarray(rng.integers(len(tok.SPECIALS), 51, (prompts, 8)),
                       jnp.int32)
  kwargs = dict(group=g, noise_level=c.noise_level, cfg_mode=c.cfg_mode,
                guidance=c.guidance)

  @jax.jit
  def sample(model, images, questions, prompt):
    pixels = images.astype(jnp.float32) / 127.5 - 1
    und = rollout.answer_rollout(
        model, pixels, questions,
        jax.random.split(jax.random.key(seed), prompts * g), group=g,
        num_tokens=2, temperature=c.temperature)
    gen = rollout.image_rollout(
        model, prompt, jax.random.split(jax.random.key(seed + 1),
                                        prompts * g),
        num_steps=c.sample_steps, sde_steps=lvrpo_schedule.sde_mask(c),
        **kwargs)
    if lvrpo_schedule.replays_subset(c):
      gen = rollout.select_transitions(gen, lvrpo_schedule.replayed_transitions(
          c, jax.random.split(jax.random.key(seed + 2), prompts * g)))
    gen['ref_means'] = rollout.image_logprobs(
        model, prompt, gen['states'], gen['next_states'],
        num_steps=c.sample_steps, steps_nk=gen.get('steps'), **kwargs)[1]
    return und, gen

  und, gen = sample(model, jnp.asarray(images), questions, prompt)
  adv = lambda: jnp.asarray(rng.normal(size=prompts * g), jnp.float32)
  return {
      'und': {'image': jnp.asarray(images), 'question': questions,
              'tokens': und['tokens'], 'mask': und['mask'],
              'logp': und['logp'], 'ref_logp': und['logp'], 'adv': adv()},
      'gen': {'prompt': prompt, 'states': gen['states'],
              'next_states': gen['next_states'], 'logp': gen['logp'],
              'ref_means': gen['ref_means'], 'adv': adv(),
              **({'steps': gen['steps']} if 'steps' in gen else {})}}


@pytest.mark.parametrize('cfg_mode, guidance, transitions, window', [
    ('none', 1.0, 0, 0), ('cond_only', 1.0, 0, 0), ('guided', 2.0, 0, 0),
    ('guided', 2.0, 2, 0), ('none', 1.0, 0, 2), ('guided', 2.0, 1, 2)])
def test_first_update_replays_the_rollout(cfg_mode, guidance, transitions,
                                          window):
  c = _config(group_size=2, sample_steps=3, cfg_mode=cfg_mode,
              guidance=guidance, train_transitions=transitions,
              sde_window=window).lvrpo
  model = _make()
  batch = _update_batch(model, c, prompts=2)
  assert batch['gen']['logp'].shape == (4, transitions or window or 3)
  if window:  # The first `window` steps are SDE steps, and only they are
    # replayed.
    assert lvrpo_schedule.sde_mask(c) == ((True,) * window
                                          + (False,) * (3 - window))
    assert int(batch['gen']['steps'].max()) < window
  else:
    assert lvrpo_schedule.sde_mask(c) is None
  loss, (count, aux) = jax.jit(
      lambda m, b: lvrpo.lvrpo_loss(m, b, None, c=c))(model, batch)
  assert float(count) == 1.0
  for task in ('und', 'gen'):
    assert float(aux[f'{task}/replay_gap']) < 1e-5, task
    assert float(aux[f'{task}/ratio_min']) == pytest.approx(1.0, abs=1e-5)
    assert float(aux[f'{task}/ratio_max']) == pytest.approx(1.0, abs=1e-5)
    assert float(aux[f'{task}/clip_low_frac']) == 0.0
  # The reference is the policy: no KL at all.
  assert float(aux['gen/kl_mean']) < 1e-10
  assert np.isfinite(float(loss))


def test_pretrain_term_adds_its_weighted_per_example_mean():
  c = _config(group_size=2, sample_steps=2, pretrain_weight=0.5).lvrpo
  model = _make()
  batch = _update_batch(model, c, prompts=2)
  record = {'image': np.full((32, 32, 3), 7, np.uint8),
            'caption': 'a red square',
            'question': 'what color is the square ?', 'answer': 'red',
            'prompt': 'a photo of a red square'}
  examples = [pretrain.PretrainExamples().map({**record, 'index': i})
              for i in range(3)]
  sft = {k: jnp.asarray(np.stack([e[k] for e in examples]))
         for k in examples[0]}
  latents = jnp.full((3, 4, 4, 4), 0.5)
  pretrain_loss = lambda m, b, r: pretrain.pretrain_loss(
      m, b, r, encode=lambda p: latents, flow_weight=1.0, prompt_dropout=0.0)
  rng = jax.random.key(3)
  # Jitted: run op by op, these two losses took 50 s to compile with an
  # empty compilation cache, against 16 s jitted.
  loss = jax.jit(lambda m, b: lvrpo.lvrpo_loss(m, b, rng, c=c,
                                               pretrain_loss=pretrain_loss))
  without, _ = loss(model, batch)
  with_sft, (_, aux) = loss(model, {**batch, 'pretrain': sft})
  total, (count, _) = jax.jit(pretrain_loss)(model, sft, rng)
  assert float(count) == 3
  assert float(with_sft - without) == pytest.approx(
      0.5 * float(total) / 3, rel=1e-5)
  assert float(aux['pretrain/text_loss']) > 0
  assert float(aux['pretrain/flow_loss']) > 0


@pytest.mark.slow  # ~45 s each: two compiles of the mu = 2 update.
@pytest.mark.parametrize('transitions', [0, 2])
def test_sharded_updates_equal_single_device_and_trace_once(compile_sharded,
                                                            transitions):
  c = _config(group_size=2, sample_steps=3, num_updates=2,
              train_transitions=transitions).lvrpo
  chex.clear_trace_counter()  # Counted per code object, over parameters.
  tx = optax.sgd(0.1)  # Linear in the gradient: see test_step.py.
  batches = [jax.tree.map(lambda x: x[None], _update_batch(_make(), c,
                                                           seed=s))
             for s in range(2)]
  loss_fn = lambda m, b, r: lvrpo.lvrpo_loss(m, b, r, c=c)

  def run(model, compile_fn):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    state = step_lib.init_state(model, tx, seed=0)
    train_step = step_lib.repeat_updates(
        step_lib.make_train_step(graphdef, rest, loss_fn, tx), c.num_updates)
    step, state = compile_fn(train_step, state)
    metrics = []
    for batch in batches:
      state, m = step(state, batch)
      metrics.append(m)
    return state, metrics

  single, single_metrics = run(_make(), lambda f, s: (jax.jit(f), s))
  mesh = sharding.make_mesh(2, 2, 2)

  sharded = lambda f, state: compile_sharded(f, state, tx, mesh)
  multi, multi_metrics = run(sharding.init_sharded(_make, mesh), sharded)
  # mu = 2 updates per batch; the state's step counts batches.
  assert int(single.step) == int(multi.step) == 2
  for want, got in zip(single_metrics, multi_metrics):
    np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-5,
                               atol=1e-7)
  # The first batch was sampled by the initial parameters: its first update
  # replays it (the later batch was sampled by them too: off-policy).
  assert float(multi_metrics[0]['gen/replay_gap']) < 1e-5
  assert float(multi_metrics[1]['gen/replay_gap']) > 1e-5
  # The second update saw moved parameters: ratios left 1.
  assert float(single_metrics[0]['gen/ratio_max']) > 1.0
  for a, b in zip(jax.tree.leaves(single.params),
                  jax.tree.leaves(multi.params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_informative_groups_by_hand():
  keep = lvrpo_groups.informative_groups
  # Groups of 2: |A| sums 0, 2, 0.5, 2, 0.
  adv = np.array([0, 0, 1, -1, 0.25, -0.25, -1, 1, 0, 0], np.float32)
  np.testing.assert_array_equal(keep(adv, 2, 2), [1, 3])
  np.testing.assert_array_equal(keep(adv, 2, 3), [1, 2, 3])
  # Degenerate groups fill up in batch order.
  np.testing.assert_array_equal(keep(adv, 2, 4), [0, 1, 2, 3])
  # ...or by prompt id, when given: the batch order does not matter.
  np.testing.assert_array_equal(keep(adv, 2, 4, ids=[9, 8, 7, 6, 5]),
                                [1, 2, 3, 4])
  with pytest.raises(ValueError, match='cannot keep 6 of 5 groups'):
    keep(adv, 2, 6)


def test_mixed_prompts_take_the_heldout_fraction():
  train = [{'split': 'train', 'index': i} for i in range(1000)]
  heldout = [{'split': 'held', 'index': i} for i in range(7)]
  mixed = lvrpo_prompts.MixedPrompts(train, heldout, 0.25)
  picks = [mixed[i]['split'] for i in range(len(mixed))]
  assert abs(picks.count('held') / len(picks) - 0.25) < 0.01
  # Any window holds about the fraction (low discrepancy).
  assert 3 <= picks[:16].count('held') <= 5
  # Held-out ids never collide with train ids.
  ids = {mixed[i]['index'] for i in range(len(mixed))}
  offset = lvrpo_prompts.HELDOUT_IDS
  assert {i - offset for i in ids if i >= offset} == set(range(7))
  none = lvrpo_prompts.MixedPrompts(train, heldout, 0.0)
  assert all(none[i]['split'] == 'train' for i in range(100))
  with pytest.raises(ValueError, match='no held-out'):
    lvrpo_prompts.MixedPrompts(train, [], 0.5)


def test_tag_filtered_keeps_the_named_tags_in_order():
  records = [{'tag': tag, 'index': i} for i, tag in enumerate(
      [b'position', b'counting', b'colors', b'position', b'counting'])]
  picked = lvrpo_prompts.TagFiltered(records, ('position', 'colors'))
  assert [picked[i]['index'] for i in range(len(picked))] == [0, 2, 3]
  assert not len(lvrpo_prompts.TagFiltered(records, ('color_attr',)))
  source = lvrpo_prompts.generation_source(records, records[:1],
                                           ('counting',), 0.0)
  assert [source[i]['index'] for i in range(len(source))] == [1, 4]
  # Held-out records hold no counting prompt.
  with pytest.raises(configs.ConfigError, match='lvrpo.gen_tags'):
    lvrpo_prompts.generation_source(records, records[:1], ('counting',), 0.5)


def test_heldout_tail_skips_the_evaluated_records():
  tail = lvrpo_prompts.HeldoutTail(list(range(10)), skip=4)
  assert [tail[i] for i in range(len(tail))] == [4, 5, 6, 7, 8, 9]
  # Fewer records than the eval uses: all of them.
  assert len(lvrpo_prompts.HeldoutTail(list(range(3)), skip=4)) == 3


def test_prompt_transforms():
  record = {'index': np.int64(3), 'image': np.zeros((32, 32, 3), np.uint8),
            'question': 'what color is the circle ?', 'answer': 'red',
            'prompt': 'a photo of a red circle'}
  und = lvrpo_prompts.UnderstandingPrompts().map(record)
  t = tok.Tokenizer()
  assert t.decode(und['question']) == record['question']
  assert und['question'][0] == tok.PAD  # Left-padded.
  assert und['answer'].tolist() == [t.encode('red')[0], tok.EOS] + [
      tok.PAD] * (questions_lib.ANSWER_TOKENS - 2)
  gen = lvrpo_prompts.GenerationPrompts().map(record)
  assert t.decode(gen['prompt']) == record['prompt']
  assert spec_lib.TAGS[gen['tag']] == 'colors'
  # Records read from the dataset hold bytes.
  gen = lvrpo_prompts.GenerationPrompts().map(
      {**record, 'prompt': b'a photo of two squares'})
  assert spec_lib.TAGS[gen['tag']] == 'counting'
  assert und['index'] == gen['index'] == 3
  # The world's records name their family; others log none.
  assert und['family'] == lvrpo_prompts.NO_FAMILY
  und = lvrpo_prompts.UnderstandingPrompts().map({**record,
                                                  'family': b'color'})
  assert und['family'] == questions_lib.FAMILIES.index('color')
  with pytest.raises(ValueError, match="unknown question family 'colour'"):
    lvrpo_prompts.family_id('colour')


def test_family_stats_by_hand():
  color, count = (questions_lib.FAMILIES.index(f) for f in ('color', 'count'))
  none = lvrpo_prompts.NO_FAMILY
  # Six answers: three about colours, two about counts, one with no family.
  families = np.array([color, color, color, count, count, none])
  components = {'answer_match': np.array([1., 0., 1., 0., 0., 1.]),
                'format': np.array([1., 1., 1., 1., .5, 1.])}
  assert lvrpo_groups.label_means(
      components, lvrpo_groups.family_labels(families), 'und/family') == {
      'und/family/color/answer_match': 2 / 3, 'und/family/color/format': 1.0,
      'und/family/count/answer_match': 0.0, 'und/family/count/format': 0.75}
  # Five groups sampled, two kept (groups 1 and 3: a colour and a count).
  groups = np.array([color, color, count, count, count])
  assert lvrpo_groups.family_labels(families) == [
      'color', 'color', 'color', 'count', 'count', None]
  assert lvrpo_groups.label_shares(lvrpo_groups.family_labels(groups),
                                   [1, 3], 'und/family') == {
      'und/family/color/sampled': 0.4, 'und/family/color/kept': 0.5,
      'und/family/count/sampled': 0.6, 'und/family/count/kept': 0.5}
  # Image groups by GenEval tag: four sampled, the first and last kept.
  tags = lvrpo_groups.tag_labels(np.array([2, 4, 2, 3]))
  assert tags == ['counting', 'position', 'counting', 'colors']
  assert lvrpo_groups.label_shares(tags, [0, 3], 'gen/tag') == {
      'gen/tag/colors/sampled': 0.25, 'gen/tag/colors/kept': 0.5,
      'gen/tag/counting/sampled': 0.5, 'gen/tag/counting/kept': 0.5,
      'gen/tag/position/sampled': 0.25, 'gen/tag/position/kept': 0.0}


def test_sample_keys_follow_the_prompt_not_its_row():
  rng = jax.random.key(0)
  keys = lvrpo.sample_keys(rng, jnp.array([7, 3]), 2)
  swapped = lvrpo.sample_keys(rng, jnp.array([3, 7]), 2)
  data = jax.random.key_data
  np.testing.assert_array_equal(data(keys[:2]), data(swapped[2:]))
  np.testing.assert_array_equal(
      data(keys[1]), data(jax.random.fold_in(jax.random.fold_in(rng, 7), 1)))
  assert len({tuple(np.asarray(data(k)).tolist()) for k in keys}) == 4


@pytest.mark.parametrize('overrides, key, reason', [
    ({'gen_batch_size': 60}, 'lvrpo.gen_batch_size',
     '60 samples do not split into groups of lvrpo.group_size=8'),
    ({'und_batch_size': 0, 'gen_batch_size': 0}, 'lvrpo.gen_batch_size',
     'both 0'),
    ({'guidance': 3.0}, 'lvrpo.guidance', "unless cfg_mode is 'guided'"),
    ({'und_generated': 0.5, 'gen_batch_size': 0}, 'lvrpo.und_generated',
     'needs lvrpo.gen_batch_size and lvrpo.und_batch_size both > 0'),
    ({'und_generated': 1.5}, 'lvrpo.und_generated', 'must be in [0, 1]'),
    ({'gen_tags': ('positon',)}, 'lvrpo.gen_tags', 'must name GenEval tags'),
    ({'train_transitions': 11}, 'lvrpo.train_transitions',
     '11 of lvrpo.sample_steps=10 transitions'),
    ({'sde_window': 11}, 'lvrpo.sde_window',
     '11 of lvrpo.sample_steps=10 transitions'),
    ({'sde_window': 4, 'train_transitions': 5}, 'lvrpo.train_transitions',
     '5 of the lvrpo.sde_window=4 SDE transitions'),
    ({'und_first_steps': 200}, 'lvrpo.und_first_steps',
     'needs fewer than lvrpo.steps=200'),
    ({'und_first_steps': 100, 'gen_batch_size': 0, 'und_generated': 0.0},
     'lvrpo.und_first_steps', 'lvrpo.und_batch_size > 0'),
])
def test_config_errors_before_any_compile(overrides, key, reason):
  with pytest.raises(configs.ConfigError) as e:
    configs.validate(_config(**overrides))
  assert e.value.key == key and reason in e.value.reason


def test_trained_tasks_by_step():
  c = _config().lvrpo
  assert [lvrpo_schedule.trained_tasks(c, s) for s in (0, 199)] == [
      ('und', 'gen')] * 2
  c.und_first_steps = 3
  assert [lvrpo_schedule.trained_tasks(c, s) for s in range(5)] == [
      ('und',), ('und',), ('und',), ('gen',), ('gen',)]
  c.und_first_steps, c.und_batch_size = 0, 0
  assert lvrpo_schedule.trained_tasks(c, 0) == ('gen',)


def test_guidance_needs_an_unconditional_model():
  config = _config(cfg_mode='guided', guidance=3.0)
  config.pretrain.prompt_dropout = 0.0
  with pytest.raises(configs.ConfigError, match='prompt_dropout is 0'):
    configs.validate(config)


def test_prompts_must_split_over_the_devices():
  # 8 fake devices, one data axis: 32 samples in groups of 8 are 4 prompts.
  config = _config(gen_batch_size=32, group_size=8)
  with pytest.raises(configs.ConfigError, match='do not split over 8'):
    lvrpo._check_batches(config)  # pylint: disable=protected-access
  lvrpo._check_batches(_config(gen_batch_size=64, und_batch_size=64))  # pylint: disable=protected-access


def _rollouts_for_questions(**overrides):
  """What `Rollouts._ask_about_images` reads of its rollout object, for the
  world of `_config()` (held-out pair: cyan triangle among others)."""
  import types  # pylint: disable=import-outside-toplevel
  from lvrpo_jax.world import stage as world_stage  # pylint: disable=import-outside-toplevel
  config = _config(**overrides)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  self = types.SimpleNamespace(
      c=config.lvrpo, seed=0, layout='grid', tokenizer=tok.Tokenizer(),
      novel=world_stage.world_and_sizes(config)[0].heldout,
      rows=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  self._pasted_questions = types.MethodType(
      lvrpo.Rollouts._pasted_questions, self)
  return self


# The first two words of each family's questions (world/questions.py).
QUESTION_STARTS = {('how', 'many'): 'count', ('what', 'color'): 'color',
                   ('what', 'shape'): 'shape', ('is', 'there'): 'exists',
                   ('is', 'the'): 'relation'}


def test_pasted_questions_replace_the_last_rows_in_their_hosts():
  from lvrpo_jax.world import examples  # pylint: disable=import-outside-toplevel
  from lvrpo_jax.world import scene as scene_lib  # pylint: disable=import-outside-toplevel
  self = _rollouts_for_questions(und_generated=0.5,
                                 und_generated_paste=True)
  world = examples.WorldSpec(heldout=self.novel)
  pick = lambda split, n, keep: [
      e for e in (examples.make_example(world, split, i)
                  for i in range(300)) if keep(e.scene)][:n]
  hosts = pick('train', 8, lambda s: len(s.objects) == 2)
  # Generated images: two showing a held-out pair, two ordinary ones.
  novel = pick('heldout', 2, lambda s: any(
      (o.color, o.shape) in self.novel.pairs for o in s.objects))
  gen = np.stack([scene_lib.render(e.scene) for e in
                  novel + hosts[:2]])
  und = {'index': np.arange(8, dtype=np.int32) + 100,
         'image': np.stack([scene_lib.render(e.scene) for e in hosts]),
         'question': np.zeros((8, questions_lib.QUESTION_LEN), np.int32),
         'answer': np.zeros((8, questions_lib.ANSWER_TOKENS), np.int32),
         'family': np.full(8, lvrpo_prompts.NO_FAMILY, np.int32)}
  und = {k: jnp.asarray(v) for k, v in und.items()}
  out, counts = lvrpo.Rollouts._ask_about_images(
      self, und, {'images': jnp.asarray(gen)}, step=3)
  out = {k: np.asarray(v) for k, v in out.items()}
  # The first half is untouched; the last four rows are composites: their
  # host's image with one more object, a held-out pair, and the host's id.
  np.testing.assert_array_equal(out['index'], und['index'])
  np.testing.assert_array_equal(out['image'][:4], und['image'][:4])
  np.testing.assert_array_equal(out['question'][:4], 0)
  assert counts == {'und/generated_prompts': 4.0, 'und/pasted_prompts': 4.0,
                    'und/novel_prompts': counts['und/novel_prompts']}
  contrast = 0
  for row in range(4, 8):
    changed = np.any(out['image'][row] != und['image'][row], axis=-1)
    assert 0 < changed.sum() <= 49  # One object box.
    words = self.tokenizer.decode(out['question'][row]).split()
    answer = self.tokenizer.decode(out['answer'][row])
    # The row's family is its new question's (the world's templates).
    assert questions_lib.FAMILIES[out['family'][row]] == QUESTION_STARTS[
        tuple(words[:2])]
    contrast += (words[:3] == ['what', 'color', 'is'] and
                 (answer, words[4]) not in self.novel.pairs)
  # und_paste_contrast 0.5: two of the four ask the colour of an ordinary
  # object; the others name the pasted one where they can.
  assert contrast == 2
  assert counts['und/novel_prompts'] >= 1
