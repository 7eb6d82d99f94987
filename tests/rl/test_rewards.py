"""LVRPO rewards on rendered scenes, real tiny models and hand numbers: r_ins
(strict and partial), r_sem and r_dense against numpy, r_kn's questions and
its score against direct greedy answers, the understanding rewards, both
reward normalizations, and failing rewards."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvrpo_jax.models import dual_encoder as dual_lib
from lvrpo_jax.models import presets
from lvrpo_jax.models import sampling
from lvrpo_jax.models import unified
from lvrpo_jax.rl import knowledge
from lvrpo_jax.rl import rewards
from lvrpo_jax.world import objects
from lvrpo_jax.world import questions as questions_lib
from lvrpo_jax.world import scene as scene_lib
from lvrpo_jax.world import spec as spec_lib
from lvrpo_jax.world import tokenizer as tok

TOKENIZER = tok.Tokenizer()


def _scene(*placed):
  """A 32 x 32 grid scene of (colour, shape, cell) objects."""
  return scene_lib.make_scene(
      32, 'grid', [(c, s) for c, s, _ in placed],
      [scene_lib.grid_origin(32, cell) for _, _, cell in placed])


def _image(*placed):
  return scene_lib.render(_scene(*placed))


def _generation_batch(cases):
  """(specs, prompts, images [N, 32, 32, 3]) of (spec, objects) cases."""
  specs = [spec for spec, _ in cases]
  return (specs, [spec_lib.prompt(s) for s in specs],
          np.stack([_image(*placed) for _, placed in cases]))


# --- r_ins --------------------------------------------------------------------


def test_r_ins_strict_and_partial_credit_on_rendered_scenes():
  two = spec_lib.color_attr('red', 'circle', 'blue', 'square')
  three = spec_lib.counting('circle', 2)
  left = spec_lib.position('circle', 'left of', 'square')
  specs, prompts, images = _generation_batch([
      (two, [('red', 'circle', 0), ('blue', 'square', 5)]),
      (two, [('green', 'circle', 0), ('blue', 'square', 5)]),
      (three, [('red', 'circle', 0), ('red', 'circle', 2),
               ('blue', 'circle', 9)]),
      (left, [('red', 'circle', 4), ('blue', 'square', 6)]),
      (left, [('red', 'square', 4), ('blue', 'circle', 6)]),
  ])
  scorer = rewards.Scorer({'r_ins': 1.0, 'r_ins_partial': 0.5})
  scores, errors = scorer.score_generation(specs, prompts, images)
  assert errors == {'r_ins': 0, 'r_ins_partial': 0}
  np.testing.assert_array_equal(scores['r_ins'], [1, 0, 0, 1, 0])
  # Checks: each include, each exclude, and "no unclassifiable blob".
  #   wrong colour: the red circle fails, the blue square and no-unknown
  #     hold: 2 of 3;
  #   three circles for "two": include holds, exclude (3 >= 3) fails,
  #     no-unknown holds: 2 of 3;
  #   circle right of the square: the square holds, the circle is found but
  #     not left of it, no-unknown holds: 2 of 3.
  np.testing.assert_allclose(scores['r_ins_partial'],
                             [1, 2 / 3, 2 / 3, 1, 2 / 3], rtol=1e-6)
  assert scores['r_ins'].dtype == np.float32


def test_strict_and_partial_detect_each_image_once(monkeypatch):
  spec = spec_lib.color_attr('red', 'circle', 'blue', 'square')
  specs, prompts, images = _generation_batch([
      (spec, [('red', 'circle', 0), ('blue', 'square', 5)]),
      (spec, [('green', 'circle', 0), ('blue', 'square', 5)])])
  calls = []
  detect = rewards.detector.detect
  monkeypatch.setattr(rewards.detector, 'detect',
                      lambda image: calls.append(1) or detect(image))
  monkeypatch.setattr(rewards.detector, '_LAST_BATCH', {})
  scorer = rewards.Scorer({'r_ins': 1.0, 'r_ins_partial': 0.5})
  scores, _ = scorer.score_generation(specs, prompts, images)
  assert len(calls) == 2
  np.testing.assert_array_equal(scores['r_ins'], [1, 0])
  # Other images (here one pixel changed) are detected afresh.
  images = images.copy()
  images[1, 0, 0] ^= 1
  scores, _ = scorer.score_generation(specs, prompts, images)
  assert len(calls) == 4
  np.testing.assert_allclose(scores['r_ins_partial'], [1, 2 / 3], rtol=1e-6)


def _recolor(image, color, rgb):
  """`image` with the pixels of palette `color` painted `rgb`."""
  image = image.copy()
  image[np.all(image == objects.PALETTE[color], axis=-1)] = rgb
  return image


def test_r_clean_is_the_share_of_classified_objects():
  spec = spec_lib.counting('circle', 2)
  clean = _image(('red', 'circle', 0), ('blue', 'circle', 2))
  # Red halfway to white is no palette colour (> COLOR_TOLERANCE from every
  # one): the detector reports that blob's colour as unknown.
  pastel = _recolor(clean, 'red', (235, 138, 138))
  both = _recolor(pastel, 'blue', (140, 160, 240))
  empty = _image()
  images = np.stack([clean, pastel, both, empty])
  found = [rewards.detector.detect(im) for im in images]
  assert [[d.known for d in f] for f in found] == [
      [True, True], [False, True], [False, False], []]
  scorer = rewards.Scorer({'r_clean': 1.0, 'r_ins': 1.0})
  scores, _ = scorer.score_generation([spec] * 4, [spec_lib.prompt(spec)] * 4,
                                      images)
  np.testing.assert_array_equal(scores['r_clean'], [1.0, 0.5, 0.0, 1.0])
  # r_ins fails every image but the clean one alike.
  np.testing.assert_array_equal(scores['r_ins'], [1, 0, 0, 0])
  assert scores['r_clean'].dtype == np.float32


def test_r_exact_pays_for_the_named_objects_and_nothing_else():
  one = spec_lib.colors('red', 'circle')
  two = spec_lib.counting('circle', 2)
  left = spec_lib.position('circle', 'left of', 'square')
  assert [s.named_objects() for s in (one, two, left)] == [1, 2, 2]
  specs, prompts, images = _generation_batch([
      (one, [('red', 'circle', 0)]),
      # An extra object passes GenEval's rule for `colors` (at least one red
      # circle) but is not what the prompt names.
      (one, [('red', 'circle', 0), ('blue', 'square', 5)]),
      (one, []),
      (two, [('red', 'circle', 0), ('green', 'circle', 2)]),
      (two, [('red', 'circle', 0), ('red', 'circle', 2),
             ('blue', 'circle', 9)]),
      # Right in number, wrong in place: r_exact counts, r_ins places.
      (left, [('red', 'square', 4), ('blue', 'circle', 6)]),
  ])
  scorer = rewards.Scorer({'r_exact': 1.0, 'r_ins': 1.0})
  scores, errors = scorer.score_generation(specs, prompts, images)
  assert errors == {'r_exact': 0, 'r_ins': 0}
  np.testing.assert_array_equal(scores['r_exact'], [1, 0, 0, 1, 0, 1])
  np.testing.assert_array_equal(scores['r_ins'], [1, 1, 0, 1, 0, 0])
  assert scores['r_exact'].dtype == np.float32


# --- r_sem and r_dense --------------------------------------------------------


@pytest.fixture(scope='module')
def encoder():
  return dual_lib.DualEncoder(dual_lib.tiny(), rngs=nnx.Rngs(0))


def _cos(a, b):
  return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_r_sem_and_r_dense_match_numpy_on_raw_features(encoder):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  prompts = ['a red circle', 'a photo of two squares',
             'an image of a circle left of a square']
  specs = [spec_lib.parse_prompt(p) for p in prompts]
  scorer = rewards.Scorer({'r_sem': 1.0, 'r_dense': 1.0},
                          dual_encoder=encoder)
  scores, _ = scorer.score_generation(specs, prompts, images)

  # Text as the reward model was trained: right-padded to 16 ids.
  ids = np.stack([TOKENIZER.encode_padded(p, 16) for p in prompts])
  pixels = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  img = np.asarray(encoder.embed_image(pixels), np.float64)
  txt = np.asarray(encoder.embed_text(ids), np.float64)
  patches = np.asarray(encoder.image_patches(pixels), np.float64)
  tokens = np.asarray(encoder.text_tokens(ids), np.float64)
  want_sem, want_dense, with_padding = [], [], []
  for n in range(3):
    want_sem.append(_cos(img[n], txt[n]))
    best = [max(_cos(tokens[n, t], p) for p in patches[n])
            for t in range(ids.shape[1])]
    words = [b for b, i in zip(best, ids[n]) if i != tok.PAD]
    assert len(words) == len(prompts[n].split())
    want_dense.append(sum(words) / len(words))
    with_padding.append(sum(best) / len(best))
  np.testing.assert_allclose(scores['r_sem'], want_sem, atol=1e-5)
  np.testing.assert_allclose(scores['r_dense'], want_dense, atol=1e-5)
  # The padding would have moved the score: the test can tell.
  assert np.abs(np.array(with_padding) - want_dense).min() > 1e-3
  assert np.all(np.abs(scores['r_sem']) <= 1.0)


def test_dense_similarity_by_hand():
  text = jnp.asarray([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])
  patches = jnp.asarray([[[0.8, 0.6], [0.0, -1.0]]])
  mask = jnp.asarray([[True, True, False]])
  # Token 0: max(0.8, 0) = 0.8; token 1: max(0.6, -1) = 0.6; token 2 masked.
  got = rewards.dense_similarity(text, patches, mask)
  np.testing.assert_allclose(got, [0.7], rtol=1e-6)


# --- r_kn ---------------------------------------------------------------------

_ANY = ('one', 'two', 'three', 'four')
_KN_CASES = [
    (spec_lib.colors('red', 'circle'), [
        ('is there a red circle ?', ('yes',)),
        ('what color is the circle ?', ('red',)),
        ('what shape is the red object ?', ('circle',))]),
    (spec_lib.counting('square', 3), [
        ('how many squares are there ?', ('three',))]),
    (spec_lib.two_object('circle', 'triangle'), [
        ('how many circles are there ?', _ANY),
        ('how many triangles are there ?', _ANY)]),
    (spec_lib.position('circle', 'left of', 'square'), [
        ('how many squares are there ?', _ANY),
        ('how many circles are there ?', _ANY),
        ('is the circle left of the square ?', ('yes',))]),
    (spec_lib.color_attr('orange', 'triangle', 'blue', 'square'), [
        ('is there an orange triangle ?', ('yes',)),
        ('is there a blue square ?', ('yes',)),
        ('what color is the triangle ?', ('orange',)),
        ('what color is the square ?', ('blue',)),
        ('what shape is the orange object ?', ('triangle',)),
        ('what shape is the blue object ?', ('square',))]),
]


@pytest.mark.parametrize('spec, want', _KN_CASES,
                         ids=[s.tag for s, _ in _KN_CASES])
def test_kn_questions_by_hand(spec, want):
  got = knowledge.questions(spec)
  assert [(q.text, q.answers) for q in got] == want


def test_kn_questions_are_the_worlds_and_a_true_scene_passes():
  # On a scene satisfying the spec, the world's own questions (same words)
  # have answers r_kn accepts.
  cases = [
      (spec_lib.color_attr('orange', 'triangle', 'blue', 'square'),
       [('orange', 'triangle', 0), ('blue', 'square', 10)]),
      (spec_lib.counting('square', 3),
       [('red', 'square', 0), ('red', 'square', 3), ('cyan', 'square', 12)]),
      (spec_lib.colors('red', 'circle'), [('red', 'circle', 5)]),
  ]
  for spec, placed in cases:
    scene = _scene(*placed)
    world = {}
    for seed in range(200):
      for family in questions_lib.FAMILIES:
        q = questions_lib.ask(np.random.default_rng(seed), scene, family)
        if q is not None:
          world[q.text] = q.answer
    for q in knowledge.questions(spec):
      assert q.text in world, q.text
      assert world[q.text] in q.answers, (q.text, world[q.text])


# The default, and calls of 3 rows: several calls, the last one padded.
@pytest.mark.parametrize('judge_rows', [rewards.JUDGE_ROWS, 3])
def test_r_kn_is_the_fraction_of_direct_greedy_answers_accepted(
    judge_rows, monkeypatch):
  monkeypatch.setattr(rewards, 'JUDGE_ROWS', judge_rows)
  # Seed 1: at seed 0 the random judge gives one reply to everything, which
  # could not show each reply landing on its own row.
  judge = unified.UnifiedModel(presets.tiny()[0], rngs=nnx.Rngs(1))
  specs, prompts, images = _generation_batch([
      (_KN_CASES[4][0], [('orange', 'triangle', 0), ('blue', 'square', 10)]),
      (_KN_CASES[2][0], [('red', 'circle', 1), ('red', 'triangle', 2)]),
      (_KN_CASES[0][0], [('red', 'circle', 5)]),
  ])
  scorer = rewards.Scorer({'r_kn': 1.0}, judge=judge)
  scores, errors = scorer.score_generation(specs, prompts, images)

  # The reference: each (image, question) pair as one row, no padding rows.
  rows, ids = [], []
  for n, spec in enumerate(specs):
    for q in knowledge.questions(spec):
      rows.append((n, q))
      words = TOKENIZER.encode(q.text)
      ids.append([tok.PAD] * (questions_lib.QUESTION_LEN - len(words)) + words)
  pixels = jnp.asarray(images[[n for n, _ in rows]], jnp.float32) / 127.5 - 1
  tokens = jax.jit(lambda m, p, q: sampling.greedy_answers(
      m, p, q, questions_lib.ANSWER_TOKENS))(judge, pixels,
                                        jnp.asarray(ids, jnp.int32))
  tokens = np.asarray(tokens)
  assert judge_rows > len(rows) or len(rows) % judge_rows
  # The random judge's replies differ by image and question, so this checks
  # that each reply lands on its own sample and question.
  assert len({TOKENIZER.decode(t) for t in tokens}) > 1
  samples, ids_rl = knowledge.question_rows(
      [knowledge.questions(s) for s in specs])
  np.testing.assert_array_equal(samples, [n for n, _ in rows])
  np.testing.assert_array_equal(ids_rl, ids)
  np.testing.assert_array_equal(
      scorer.models.answer(images[samples], ids_rl), tokens)
  # Each reply is scored on its last word (what follows any rationale).
  answers = [questions_lib.answer_word(TOKENIZER.decode(t)) for t in tokens]
  per_sample = [[a for (n, _), a in zip(rows, answers) if n == i]
                for i in range(len(specs))]
  assert rewards.kn_answers(scorer.models, specs, images) == per_sample
  want = [np.mean([a in q.answers for (n, q), a in zip(rows, answers)
                   if n == i]) for i in range(len(specs))]
  np.testing.assert_allclose(scores['r_kn'], want, rtol=1e-6)
  assert errors == {'r_kn': 0}


def test_kn_scores_by_hand():
  specs = [spec_lib.colors('red', 'circle'), spec_lib.counting('square', 3),
           spec_lib.two_object('circle', 'triangle')]
  answers = [['yes', 'blue', 'circle'],  # 2 of 3
             ['four'],                   # 0 of 1: exactly three
             ['two', 'zero']]            # 1 of 2: at least one each
  np.testing.assert_allclose(knowledge.scores(specs, answers),
                             [2 / 3, 0, 1 / 2], rtol=1e-6)
  # A spec naming nothing derives no question: an error, not a NaN reward.
  with pytest.raises(ValueError, match='derives no r_kn question'):
    knowledge.scores([spec_lib.Spec('single_object', include=())], [[]])


# --- understanding rewards ----------------------------------------------------


def _ids(*words):
  return [tok.EOS if w == '<eos>' else tok.PAD if w == '<pad>'
          else TOKENIZER.ids[w] for w in words]


def test_answer_match_and_format_on_hand_tokens():
  tokens = np.array([
      _ids('two', '<eos>', '<pad>'),      # right, well formed
      _ids('two', '<eos>', '<pad>'),      # right as a numeral
      _ids('red', 'circle', '<eos>'),     # two words
      _ids('yes', '<eos>', '<pad>'),      # right up to case
      _ids('circle', '<pad>', '<pad>'),   # no <eos>
      _ids('how', '<eos>', '<pad>'),      # not an answer word
      _ids('<eos>', '<pad>', '<pad>'),    # empty
  ], np.int32)
  truth = ['two', '2', 'red', 'Yes', 'circle', 'how', 'no']
  scorer = rewards.Scorer({'answer_match': 1.0, 'format': 0.1})
  scores, errors = scorer.score_understanding(truth, tokens)
  np.testing.assert_array_equal(scores['answer_match'],
                                [1, 1, 0, 1, 1, 1, 0])
  np.testing.assert_array_equal(scores['format'], [1, 1, 0, 1, 0, 0, 0])
  assert errors == {'answer_match': 0, 'format': 0}
  assert rewards.normalize_answer(' The  Red circle. ') == 'red circle'


def test_answer_match_and_format_after_a_rationale():
  # A relation's reply: two grid cells (row, column), then the answer.
  tokens = np.array([
      _ids('one', 'zero', 'one', 'two', 'yes', '<eos>'),   # well formed
      _ids('one', 'zero', 'one', 'two', 'no', '<eos>'),    # wrong answer
      _ids('one', 'zero', 'one', 'yes', '<eos>', '<pad>'),  # 3 cell words
      _ids('one', 'red', 'one', 'two', 'yes', '<eos>'),    # not a number
      _ids('one', 'zero', 'one', 'two', 'three', 'yes'),   # no <eos>
      _ids('no', '<eos>', '<pad>', '<pad>', '<pad>', '<pad>'),  # bare
  ], np.int32)
  truth = ['yes', 'yes', 'yes', 'yes', 'yes', 'no']
  scores, _ = rewards.Scorer({'answer_match': 1.0, 'format': 0.1}
                             ).score_understanding(truth, tokens)
  # The answer is the last word, whatever precedes it.
  np.testing.assert_array_equal(scores['answer_match'], [1, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(scores['format'], [1, 1, 0, 0, 0, 1])


# --- combine ------------------------------------------------------------------


def test_combine_per_component_equalizes_what_sum_lets_one_dominate():
  # G = 2. Group 0: the binary reward prefers sample 0 and the cosine
  # prefers sample 1; group 1: the binary reward ties.
  components = {'r_ins': np.array([1.0, 0.0, 0.0, 0.0]),
                'r_sem': np.array([0.30, 0.32, 0.25, 0.35])}
  weights = {'r_ins': 1.0, 'r_sem': 1.0, 'format': 3.0}
  g0 = 1 / (1 + 2e-6 / 0.98)  # (d / 2) / (d / 2 + eps), d = 1.30 - 0.32
  g1 = 1 / (1 + 2e-6 / 0.10)
  adv, stats = rewards.combine(components, weights, 2, 'sum')
  # The sum is [1.30, 0.32 | 0.25, 0.35]: the binary reward decides group 0.
  np.testing.assert_allclose(adv, [g0, -g0, -g1, g1], rtol=1e-5)
  per, _ = rewards.combine(components, weights, 2, 'per_component')
  # Each component is +-1 within group 0, so they cancel.
  a_sem0 = 1 / (1 + 2e-6 / 0.02)
  np.testing.assert_allclose(per, [1 - a_sem0, a_sem0 - 1, -g1, g1],
                             atol=1e-5)
  assert adv.dtype == per.dtype == jnp.float32
  assert float(stats['r_ins/mean']) == pytest.approx(0.25)
  assert float(stats['r_ins/std']) == pytest.approx(math.sqrt(0.1875))
  assert float(stats['r_sem/mean']) == pytest.approx(0.305)
  assert float(stats['r_sem/std']) == pytest.approx(
      math.sqrt((0.005**2 + 0.015**2 + 0.055**2 + 0.045**2) / 4), rel=1e-5)
  assert float(stats['total/mean']) == pytest.approx(0.555)
  assert int(stats['degenerate_groups']) == 0


def test_combine_per_component_over_the_batch_std_by_hand():
  # The components above, each divided by its batch std instead of its
  # group's: r_ins std sqrt(0.1875), r_sem sqrt(0.0053 / 4). r_sem's small
  # gap in group 0 (0.02) no longer cancels r_ins's win there, while its
  # larger gap in group 1 (0.10) still decides that group.
  components = {'r_ins': np.array([1.0, 0.0, 0.0, 0.0]),
                'r_sem': np.array([0.30, 0.32, 0.25, 0.35])}
  weights = {'r_ins': 1.0, 'r_sem': 1.0}
  ins = 0.5 / math.sqrt(0.1875)
  sem0, sem1 = (0.01 / math.sqrt(0.0053 / 4), 0.05 / math.sqrt(0.0053 / 4))
  adv, _ = rewards.combine(components, weights, 2, 'per_component',
                           std_level='batch')
  np.testing.assert_allclose(adv, [ins - sem0, sem0 - ins, -sem1, sem1],
                             rtol=1e-4)
  # 'sum' divides the weighted sum by its batch std.
  total = components['r_ins'] + components['r_sem']
  adv, _ = rewards.combine(components, weights, 2, 'sum', std_level='batch')
  centered = total - np.repeat(total.reshape(2, 2).mean(1), 2)
  np.testing.assert_allclose(adv, centered / total.std(), rtol=1e-4)


def test_combine_weights_and_dr_grpo_by_hand():
  components = {'a': np.array([1.0, 0.0, 2.0, 2.0]),
                'b': np.array([0.0, 4.0, 1.0, 3.0])}
  weights = {'a': 2.0, 'b': 0.5}
  # Weighted sums: [2, 2 | 4.5, 5.5]; group 0 is degenerate.
  adv, stats = rewards.combine(components, weights, 2, 'sum',
                               scale_by_std=False)
  np.testing.assert_allclose(adv, [0, 0, -0.5, 0.5], atol=1e-6)
  assert int(stats['degenerate_groups']) == 1
  per, _ = rewards.combine(components, weights, 2, 'per_component',
                           scale_by_std=False)
  # 2 * [0.5, -0.5 | 0, 0] + 0.5 * [-2, 2 | -1, 1]: without the std both
  # modes are the same linear map of the rewards.
  np.testing.assert_allclose(per, [0, 0, -0.5, 0.5], atol=1e-6)
  per, _ = rewards.combine({'a': components['a']}, weights, 4,
                           'per_component', scale_by_std=False)
  np.testing.assert_allclose(per, 2 * (components['a'] - 1.25), atol=1e-6)


def test_combine_scaled_by_mean_by_hand():
  components = {'a': np.array([1.0, 0.0, 0.0, 0.0]),
                'b': np.array([1.0, 1.0, 1.0, 0.5])}
  weights = {'a': 1.0, 'b': 0.1}
  adv, _ = rewards.combine(components, weights, 4, 'per_component',
                           scale_by_std=True, scale_by_mean=True)
  # a: mean 1/4 -> [3, -1, -1, -1]; b: mean 7/8 -> [1/7, 1/7, 1/7, -3/7].
  # scale_by_mean wins over scale_by_std.
  np.testing.assert_allclose(
      adv, np.array([3, -1, -1, -1]) + 0.1 * np.array([1, 1, 1, -3]) / 7,
      rtol=1e-5)
  adv, _ = rewards.combine(components, weights, 4, 'sum',
                           scale_by_mean=True)
  total = components['a'] + 0.1 * components['b']
  np.testing.assert_allclose(adv, (total - total.mean()) / total.mean(),
                             rtol=1e-5)
  with pytest.raises(ValueError, match=r"rewards >= 0; \['b'\]"):
    rewards.combine({'a': np.ones(4), 'b': -np.ones(4)}, weights, 4,
                    'per_component', scale_by_mean=True)


def test_combine_rejects_bad_arguments():
  with pytest.raises(ValueError, match="reward_norm 'mean'"):
    rewards.combine({'a': np.zeros(4)}, {'a': 1.0}, 2, 'mean')
  with pytest.raises(ValueError, match=r"\['b'\] have no weight"):
    rewards.combine({'a': np.zeros(4), 'b': np.zeros(4)}, {'a': 1.0}, 2,
                    'sum')
  with pytest.raises(ValueError, match='group_size=3'):
    rewards.combine({'a': np.zeros(4)}, {'a': 1.0}, 3, 'sum')


# --- failing rewards and missing models ---------------------------------------


def _colour_words(models, specs, prompts, images):
  """Colour words per prompt word; raises for a prompt with no colour."""
  del models, specs, images
  out = []
  for p in prompts:
    n = sum(w in objects.COLORS for w in p.split())
    if not n:
      raise ValueError(f'no colour in {p!r}')
    out.append(n / len(p.split()))
  return np.array(out)


@pytest.fixture
def fragile(monkeypatch):
  monkeypatch.setitem(rewards.REWARDS, 'fragile', rewards.Reward(
      'fragile', 'generation', _colour_words))


def test_reward_errors_raise_names_reward_sample_and_prompt(fragile):
  del fragile
  specs, prompts, images = _generation_batch([
      (spec_lib.colors('red', 'circle'), [('red', 'circle', 0)]),
      (spec_lib.single_object('square'), [('red', 'square', 0)]),
  ])
  scorer = rewards.Scorer({'fragile': 1.0, 'r_ins': 1.0})
  with pytest.raises(rewards.RewardError) as info:
    scorer.score_generation(specs, prompts, images)
  message = str(info.value)
  assert "reward 'fragile' failed on sample 1" in message
  assert "prompt 'a photo of a square'" in message
  assert "ValueError: no colour in 'a photo of a square'" in message


def test_reward_errors_zero_scores_and_counts(fragile):
  del fragile
  specs, prompts, images = _generation_batch([
      (spec_lib.colors('red', 'circle'), [('red', 'circle', 0)]),
      (spec_lib.single_object('square'), [('red', 'square', 0)]),
      (spec_lib.colors('blue', 'square'), [('red', 'square', 0)]),
  ])
  scorer = rewards.Scorer({'fragile': 1.0, 'r_ins': 1.0},
                          reward_errors='zero')
  scores, errors = scorer.score_generation(specs, prompts, images)
  np.testing.assert_allclose(scores['fragile'], [1 / 6, 0.0, 1 / 6],
                             rtol=1e-6)
  np.testing.assert_array_equal(scores['r_ins'], [1, 1, 0])
  assert errors == {'fragile': 1, 'r_ins': 0}


def test_understanding_errors_name_the_question():
  tokens = np.array([_ids('no', '<eos>'), [99, tok.EOS]], np.int32)
  questions = ['is there a red circle ?', 'what color is the square ?']
  strict = rewards.Scorer({'answer_match': 1.0})
  with pytest.raises(rewards.RewardError,
                     match=r"'answer_match' failed on sample 1 \(question "
                     r"'what color is the square \?', true answer 'red'\)"):
    strict.score_understanding(['no', 'red'], tokens, questions)
  lenient = rewards.Scorer({'answer_match': 1.0}, reward_errors='zero')
  scores, errors = lenient.score_understanding(['no', 'red'], tokens)
  np.testing.assert_array_equal(scores['answer_match'], [1, 0])
  assert errors == {'answer_match': 1}


def test_non_finite_rewards_are_errors(monkeypatch):
  monkeypatch.setitem(rewards.REWARDS, 'nan', rewards.Reward(
      'nan', 'understanding',
      lambda models, answers, tokens: np.array(
          [float('nan') if a == 'no' else 1.0 for a in answers])))
  scorer = rewards.Scorer({'nan': 1.0}, reward_errors='zero')
  scores, errors = scorer.score_understanding(
      ['yes', 'no'], np.array([_ids('yes', '<eos>')] * 2))
  np.testing.assert_array_equal(scores['nan'], [1, 0])
  assert errors == {'nan': 1}


def test_scorer_asks_for_missing_models_and_rejects_bad_config():
  with pytest.raises(ValueError, match="reward 'r_kn'.*judge=None"):
    rewards.Scorer({'r_ins': 1.0, 'r_kn': 0.5})
  with pytest.raises(ValueError, match="reward 'r_dense'.*dual_encoder"):
    rewards.Scorer({'r_dense': 1.0})
  assert rewards.Scorer({'r_kn': 0.0, 'r_ins': 1.0}).weights == {'r_ins': 1.0}
  with pytest.raises(ValueError, match=r"unknown rewards \['r_typo'\]"):
    rewards.Scorer({'r_typo': 1.0})
  with pytest.raises(ValueError, match="reward_errors='skip'"):
    rewards.Scorer({'r_ins': 1.0}, reward_errors='skip')
