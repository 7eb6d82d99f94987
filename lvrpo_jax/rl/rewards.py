"""LVRPO's rewards (DESIGN §6): registered functions, a scorer, composition.

Generation rewards score N = prompts x G generated images [N, H, W, 3]
(uint8) against their prompts and the prompts' `Spec`s:
  r_ins          1 if the detector's objects satisfy the spec under
                 GenEval's rules (`world.verify`), else 0;
  r_ins_partial  the verifier's partial credit: the fraction of the spec's
                 checks that hold, in [0, 1];
  r_clean        the fraction of the detected objects that the detector
                 classifies (a palette colour and a known shape); 1 with
                 none;
  r_exact        1 if the detector finds exactly as many objects as the
                 prompt names (the world's scenes show nothing else), else
                 0: GenEval's rules ask for at least the named objects
                 outside `counting`, so r_ins alone pays for extras;
  r_sem          cosine of the frozen dual encoder's image and prompt
                 embeddings, in [-1, 1];
  r_dense        for each prompt token, the best cosine over the image's
                 patches, averaged over the prompt's (non-padding) tokens;
  r_kn           the fraction of questions derived from the spec
                 (`knowledge.questions`), worded as the world's VQA
                 questions, that a frozen judge (the reference model's
                 understanding path, greedy) answers
                 correctly about the image.
Understanding rewards score N sampled answers [N, T] to questions:
  answer_match   1 if the decoded answer equals the true one after
                 normalization (case, articles, punctuation, numerals);
  format         1 if the sample is one answer word followed by <eos>.

`Scorer` runs the rewards that a config weights (nonzero weights only), with
the frozen models' forward passes jitted once, and isolates a sample that
makes a reward fail. `combine` turns the components into GRPO advantages:
'sum' normalizes the weighted sum within each group (the paper), while
'per_component' normalizes each component within its group first, so a
binary reward (variance ~0.25) cannot drown a cosine (variance ~0.001).

Shapes: N samples, G group size, R (sample, question) rows, L question
tokens, A answer tokens, T text tokens, P patches, D embedding width.
"""

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvrpo_jax import multihost
from lvrpo_jax import world
from lvrpo_jax.models import sampling
from lvrpo_jax.models import vae
from lvrpo_jax.rl import grpo
from lvrpo_jax.rl import knowledge
from lvrpo_jax.world import detector
from lvrpo_jax.world import objects
from lvrpo_jax.world import questions as questions_lib
from lvrpo_jax.world import spec as spec_lib
from lvrpo_jax.world import tokenizer as tok

TASKS: tuple[str, ...] = ('generation', 'understanding')
REWARD_NORMS: tuple[str, ...] = ('sum', 'per_component')
REWARD_ERRORS: tuple[str, ...] = ('raise', 'zero')
FROZEN_MODELS: tuple[str, ...] = ('dual_encoder', 'judge')
ANSWER_WORDS = frozenset(spec_lib.NUMBERS + objects.COLORS + objects.SHAPES
                         + ('yes', 'no'))
_TOKENIZER = tok.Tokenizer()
_ANSWER_IDS = np.array(sorted(_TOKENIZER.ids[w] for w in ANSWER_WORDS))
_NUMBER_IDS = np.array(sorted(_TOKENIZER.ids[w] for w in spec_lib.NUMBERS))
# The judge answers r_kn's (image, question) rows in calls of this many, the
# last padded, so its program traces once whatever a step's prompts ask. A
# step's 64 images ask ~190 questions: 3 calls. (Padding every image to the
# most questions a prompt can derive judged 2.7x the rows: 0.44 s a step.)
JUDGE_ROWS = 64


class RewardError(RuntimeError):
  """A reward failed on a sample (named with its prompt or question)."""


def _jit_frozen(model: nnx.Module, fn: Callable) -> Callable:
  """fn(model, *args) jitted once, returning numpy. The parameters are an
  argument, not constants folded into the program, so a large model
  compiles quickly and is held once. Rewards score this process's samples
  on the host, so parameters that span several processes are copied here
  whole (`multihost.local_copy`)."""
  graph, state = nnx.split(model)
  state = multihost.local_copy(state)
  call = jax.jit(lambda s, *args: fn(nnx.merge(graph, s), *args))
  return lambda *args: np.asarray(call(state, *args))


class FrozenModels:
  """The frozen reward models and their jitted forward passes.

  Attributes:
    dual_encoder: a `DualEncoder` (r_sem, r_dense) or None; with it
      `sem(images, ids)` and `dense(images, ids)` -> [N], and `text_len`.
    judge: a `UnifiedModel` (r_kn) or None; with it `answer(images, ids_rl)`
      -> the greedy answer tokens [R, A] to questions [R, L] about images
      [R, H, W, 3] (uint8), JUDGE_ROWS rows per call.
  """

  def __init__(self, dual_encoder=None, judge=None):
    self.dual_encoder, self.judge = dual_encoder, judge
    if dual_encoder is not None:
      self.text_len = dual_encoder.config.text.max_len
      self.sem = _jit_frozen(dual_encoder, _sem)
      self.dense = _jit_frozen(dual_encoder, _dense)
    if judge is not None:
      self._answer_rows = _jit_frozen(judge, _judge_answers)

  def answer(self, images, ids_rl) -> np.ndarray:
    """The judge's greedy answer tokens [R, A] (see the class docstring)."""
    rows = ids_rl.shape[0]
    if images.shape[0] != rows:
      raise ValueError(f'{images.shape[0]} images for {rows} questions')
    # Padding rows repeat row 0 (any valid row does) and are dropped.
    pad = np.zeros((-rows % JUDGE_ROWS,), np.int32)
    images = np.concatenate([images, images[pad]])
    ids_rl = np.concatenate([ids_rl, ids_rl[pad]])
    return np.concatenate([
        self._answer_rows(images[i:i + JUDGE_ROWS], ids_rl[i:i + JUDGE_ROWS])
        for i in range(0, images.shape[0], JUDGE_ROWS)])[:rows]


def _sem(encoder, images, ids_nt):
  """cosine(image embedding, text embedding) [N] of uint8 images."""
  return jnp.einsum('nd,nd->n', encoder.embed_image(vae.from_uint8(images)),
                    encoder.embed_text(ids_nt))


def _dense(encoder, images, ids_nt):
  """`dense_similarity` [N] of uint8 images and text ids, padding out."""
  return dense_similarity(encoder.text_tokens(ids_nt),
                          encoder.image_patches(vae.from_uint8(images)),
                          ids_nt != tok.PAD)


def _judge_answers(judge, images, ids_rl):
  """Greedy answer tokens [R, A] to questions [R, L] about uint8 images."""
  return sampling.greedy_answers(judge, vae.from_uint8(images), ids_rl,
                                 questions_lib.ANSWER_TOKENS)


def dense_similarity(text_ntd, patches_npd, mask_nt):
  """r_dense from unit-norm features: for each masked-in token, the best
  cosine over patches; the mean over those tokens ([N]; 0 without any).

  Args:
    text_ntd: [N, T, D] token features.
    patches_npd: [N, P, D] patch features.
    mask_nt: [N, T] True on the prompt's tokens.
  """
  best_nt = jnp.einsum('ntd,npd->ntp', text_ntd, patches_npd).max(axis=-1)
  count_n = mask_nt.sum(axis=1)
  return (jnp.where(mask_nt, best_nt, 0.0).sum(axis=1) /
          jnp.maximum(count_n, 1))


# --- generation rewards -------------------------------------------------------


def _check_images(images) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError('images must be uint8 [N, H, W, 3], got '
                     f'{images.dtype} {list(images.shape)}')
  return images


def _prompt_ids(prompts: Sequence[str], length: int) -> np.ndarray:
  """int32 [N, length], right-padded as the reward model's captions were
  (train/reward_model.py), so prompt and caption embeddings compare."""
  for p in prompts:
    if not p.split():
      raise ValueError(f'prompt {p!r} has no words')
  return np.stack([_TOKENIZER.encode_padded(p, length) for p in prompts])


def _verdicts(specs, images) -> list[world.Verdict]:
  """The world's verdicts on each (spec, image); r_ins and r_ins_partial
  share the batch's detections (`detect_batch` keeps the last batch's)."""
  return [world.verify(s, found) for s, found in zip(
      specs, detector.detect_batch(_check_images(images)), strict=True)]


def r_ins(models, specs, prompts, images) -> np.ndarray:
  """1.0 where the detected objects satisfy the spec (GenEval), else 0.0."""
  del models, prompts
  return np.array([v.passed for v in _verdicts(specs, images)], np.float32)


def r_ins_partial(models, specs, prompts, images) -> np.ndarray:
  """The verifier's partial credit [N]: the fraction of checks that hold."""
  del models, prompts
  return np.array([v.partial for v in _verdicts(specs, images)], np.float32)


def r_clean(models, specs, prompts, images) -> np.ndarray:
  """The share [N] of each image's detected objects that are classified
  (colour and shape), 1.0 where none is detected.

  r_ins fails an image with any unclassifiable blob, but as one of many
  reasons; this scores the blobs alone, so a group's images that differ
  only in how cleanly they are drawn still get different advantages.
  """
  del models, specs, prompts
  return np.array([np.mean([d.known for d in found]) if found else 1.0
                   for found in detector.detect_batch(_check_images(images))],
                  np.float32)


def r_exact(models, specs, prompts, images) -> np.ndarray:
  """1.0 where the image holds exactly `spec.named_objects()` detected
  objects, else 0.0 [N].

  GenEval's rules check that the named objects are there and, for
  `counting` only, that there are no more: under r_ins alone a policy
  gains by drawing extra objects (more chances to show the named ones),
  which the counting prompts then fail.
  """
  del models, prompts
  return np.array([len(found) == s.named_objects() for s, found in zip(
      specs, detector.detect_batch(_check_images(images)), strict=True)],
                  np.float32)


def r_sem(models, specs, prompts, images) -> np.ndarray:
  """cosine(image embedding, prompt embedding) [N] in [-1, 1]."""
  del specs
  return models.sem(_check_images(images),
                    _prompt_ids(prompts, models.text_len))


def r_dense(models, specs, prompts, images) -> np.ndarray:
  """Mean over prompt tokens of the max over patches of the cosine [N]."""
  del specs
  return models.dense(_check_images(images),
                      _prompt_ids(prompts, models.text_len))


def kn_answers(models, specs, images) -> list[list[str]]:
  """The judge's answers to each sample's `knowledge.questions`, in
  order."""
  questions = [knowledge.questions(s) for s in specs]
  samples, ids = knowledge.question_rows(questions)
  if not len(samples):
    return [[] for _ in questions]
  words = iter(questions_lib.answer_word(_TOKENIZER.decode(t))
               for t in models.answer(_check_images(images)[samples], ids))
  return [[next(words) for _ in qs] for qs in questions]


def r_kn(models, specs, prompts, images) -> np.ndarray:
  """The fraction [N] of each sample's questions the judge gets right."""
  del prompts
  return knowledge.scores(specs, kn_answers(models, specs, images))


# --- understanding rewards ----------------------------------------------------


def normalize_answer(text: str) -> str:
  """Lower case, articles and punctuation dropped, numerals as words."""
  words = []
  for w in text.lower().split():
    w = w.strip('.,?!')
    if w and w not in ('a', 'an', 'the'):
      if w.isdigit() and int(w) < len(spec_lib.NUMBERS):
        w = spec_lib.NUMBERS[int(w)]
      words.append(w)
  return ' '.join(words)


def answer_match(models, true_answers, tokens) -> np.ndarray:
  """1.0 where the last word of the decoded tokens [N, T] (the answer
  after any rationale) normalizes to the true answer."""
  del models
  return np.array([
      normalize_answer(questions_lib.answer_word(_TOKENIZER.decode(ids)))
      == normalize_answer(answer)
      for answer, ids in zip(true_answers, np.asarray(tokens), strict=True)],
                  np.float32)


def format_reward(models, true_answers, tokens) -> np.ndarray:
  """1.0 where tokens [N, T] are one answer word then <eos>, or a
  rationale (RATIONALE_WORDS number words) then those; else 0.0."""
  del models, true_answers
  tokens = np.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f'tokens must be [N, T], got shape {tokens.shape}')
  ok = np.zeros(tokens.shape[0], bool)
  for words in (0, questions_lib.RATIONALE_WORDS):
    if tokens.shape[1] < words + 2:
      continue
    ok |= (np.isin(tokens[:, :words], _NUMBER_IDS).all(axis=1)
           & np.isin(tokens[:, words], _ANSWER_IDS)
           & (tokens[:, words + 1] == tok.EOS))
  return ok.astype(np.float32)


# --- registry and scorer ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reward:
  """A registered reward.

  Attributes:
    name: its key in REWARDS and in configs' weights.
    task: 'generation' (fn(models, specs, prompts, images)) or
      'understanding' (fn(models, true_answers, tokens)); fn returns [N].
    fn: the reward function; `models` is a `FrozenModels`.
    needs: the frozen models it calls, names in FROZEN_MODELS.
  """
  name: str
  task: str
  fn: Callable[..., np.ndarray]
  needs: tuple[str, ...] = ()

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f'reward {self.name!r}: unknown task {self.task!r}; '
                       f'use one of {TASKS}')
    unknown = sorted(set(self.needs) - set(FROZEN_MODELS))
    if unknown:
      raise ValueError(f'reward {self.name!r} needs unknown models '
                       f'{unknown}; known: {FROZEN_MODELS}')


REWARDS: dict[str, Reward] = {r.name: r for r in (
    Reward('r_ins', 'generation', r_ins),
    Reward('r_ins_partial', 'generation', r_ins_partial),
    Reward('r_clean', 'generation', r_clean),
    Reward('r_exact', 'generation', r_exact),
    Reward('r_sem', 'generation', r_sem, ('dual_encoder',)),
    Reward('r_dense', 'generation', r_dense, ('dual_encoder',)),
    Reward('r_kn', 'generation', r_kn, ('judge',)),
    Reward('answer_match', 'understanding', answer_match),
    Reward('format', 'understanding', format_reward),
)}


def _call(reward: Reward, models, inputs, n: int) -> np.ndarray:
  """reward.fn on inputs, checked to be finite float32 [n]."""
  out = np.asarray(reward.fn(models, *inputs), np.float32)
  if out.shape != (n,):
    raise ValueError(f'returned shape {out.shape}, expected ({n},)')
  bad = np.flatnonzero(~np.isfinite(out))
  if bad.size:
    raise ValueError(f'non-finite rewards {out[bad].tolist()} at samples '
                     f'{bad.tolist()}')
  return out


class Scorer:
  """Scores samples with the rewards a config weights.

  Args:
    weights: {reward name: weight}; rewards weighted 0 do not run.
    dual_encoder: the frozen `DualEncoder` (for r_sem, r_dense) or None.
    judge: the frozen `UnifiedModel` answering r_kn's questions or None.
    reward_errors: when a reward raises on a sample, 'raise' a RewardError
      naming it, or give that sample 'zero' for that reward and count it.

  Raises:
    ValueError: for an unknown reward or `reward_errors`, or a selected
      reward whose frozen model is None.
  """

  def __init__(self, weights: dict[str, float], *, dual_encoder=None,
               judge=None, reward_errors: str = 'raise'):
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
      raise ValueError(f'unknown rewards {unknown}; registered: '
                       f'{sorted(REWARDS)}')
    if reward_errors not in REWARD_ERRORS:
      raise ValueError(f'reward_errors={reward_errors!r}; use one of '
                       f'{REWARD_ERRORS}')
    self.weights = {k: float(w) for k, w in weights.items() if w}
    self.rewards = {k: REWARDS[k] for k in self.weights}
    self.reward_errors = reward_errors
    given = {'dual_encoder': dual_encoder, 'judge': judge}
    for name, reward in self.rewards.items():
      for need in reward.needs:
        if given[need] is None:
          raise ValueError(f'reward {name!r} (weight {self.weights[name]}) '
                           f'needs a frozen {need} model; got {need}=None')
    self.models = FrozenModels(dual_encoder, judge)

  def score_generation(self, specs: Sequence[spec_lib.Spec],
                       prompts: Sequence[str], images):
    """Generation rewards of N images.

    Args:
      specs: the N samples' prompt specs.
      prompts: their prompt strings.
      images: uint8 [N, H, W, 3].

    Returns:
      ({name: float32 [N]} for each selected generation reward,
       {name: samples that failed and scored 0}).
    """
    images = np.asarray(images)
    if not len(specs) == len(prompts) == images.shape[0]:
      raise ValueError(f'{len(specs)} specs, {len(prompts)} prompts and '
                       f'{images.shape[0]} images; need one of each per '
                       'sample')
    return self._score('generation', (list(specs), list(prompts), images),
                       lambda i: f'prompt {prompts[i]!r}')

  def score_understanding(self, true_answers: Sequence[str], tokens,
                          questions: Sequence[str] | None = None):
    """Understanding rewards of N sampled answers.

    Args:
      true_answers: the N true answer strings.
      tokens: int [N, T] sampled answer tokens (<eos>, then <pad>).
      questions: the questions, only to name a failing sample.

    Returns:
      As `score_generation`, for the understanding rewards.
    """
    tokens = np.asarray(tokens)
    if len(true_answers) != tokens.shape[0]:
      raise ValueError(f'{len(true_answers)} answers for '
                       f'{tokens.shape[0]} token rows')

    def describe(i):
      asked = '' if questions is None else f'question {questions[i]!r}, '
      return f'{asked}true answer {true_answers[i]!r}'

    return self._score('understanding', (list(true_answers), tokens),
                       describe)

  def _score(self, task: str, inputs: tuple, describe: Callable[[int], str]):
    components, errors = {}, {}
    for name, reward in self.rewards.items():
      if reward.task == task:
        components[name], errors[name] = self._run(reward, inputs, describe)
    return components, errors

  def _run(self, reward: Reward, inputs: tuple, describe):
    """(scores [N], failed samples): the batch at once or, if that fails,
    sample by sample to find the failing ones."""
    n = len(inputs[0])
    try:
      return _call(reward, self.models, inputs, n), 0
    except Exception as e:  # pylint: disable=broad-except
      batch_error = e
    scores, failed = np.zeros((n,), np.float32), 0
    for i in range(n):
      try:
        scores[i] = _call(reward, self.models,
                          tuple(x[i:i + 1] for x in inputs), 1)[0]
      except Exception as e:  # pylint: disable=broad-except
        if self.reward_errors == 'raise':
          raise RewardError(
              f'reward {reward.name!r} failed on sample {i} ({describe(i)})'
              f': {type(e).__name__}: {e}') from e
        failed += 1
    if not failed:
      raise RewardError(
          f'reward {reward.name!r} failed on the batch of {n} samples but '
          f'on no single one: {type(batch_error).__name__}: {batch_error}'
      ) from batch_error
    return scores, failed


# --- composition --------------------------------------------------------------


def combine(components: dict, weights: dict, group_size: int,
            reward_norm: str, *, scale_by_std: bool = True,
            scale_by_mean: bool = False, std_level: str = 'group'):
  """GRPO advantages of weighted reward components.

  'sum' (the paper): A = group_advantages(sum_k w_k r_k). 'per_component':
  A = sum_k w_k group_advantages(r_k), so each component carries weight w_k
  whatever its spread (DESIGN §6).

  Args:
    components: {name: [N]} rewards, N/G consecutive groups of G.
    weights: {name: w_k}; every component needs one (others are ignored).
    group_size: G.
    reward_norm: 'sum' or 'per_component'.
    scale_by_std: divide by the group's std (GRPO) or not (Dr. GRPO).
    scale_by_mean: divide by the group's mean instead (the gradient of
      log E[r], `grpo.group_advantages`); every reward must be >= 0.
    std_level: with scale_by_std, divide by the 'group''s std or the
      'batch''s (per component with 'per_component': a component that
      barely varies within a group is not scaled up to unit spread).

  Returns:
    (advantages float32 [N], stats): '<name>/mean' and '<name>/std' over the
    batch per component, 'total/mean' and 'total/std' of the weighted sum,
    and 'degenerate_groups' (groups whose weighted sum is constant).
  """
  if reward_norm not in REWARD_NORMS:
    raise ValueError(f'unknown reward_norm {reward_norm!r}; use one of '
                     f'{REWARD_NORMS}')
  if not components:
    raise ValueError('no reward components to combine')
  missing = sorted(set(components) - set(weights))
  if missing:
    raise ValueError(f'reward components {missing} have no weight')
  r = {k: jnp.asarray(v, jnp.float32) for k, v in components.items()}
  if scale_by_mean:
    negative = sorted(k for k, v in r.items() if bool(jnp.any(v < 0)))
    if negative:
      raise ValueError(f'scale_by_mean needs rewards >= 0; {negative} have '
                       'negative ones')
  scale = dict(scale_by_std=scale_by_std and not scale_by_mean,
               scale_by_mean=scale_by_mean, std_level=std_level)
  total_n = sum(weights[k] * v for k, v in r.items())
  if reward_norm == 'sum':
    adv_n = grpo.group_advantages(total_n, group_size, **scale)
  else:
    adv_n = sum(weights[k] * grpo.group_advantages(v, group_size, **scale)
                for k, v in r.items())
  stats = {}
  for k, v in r.items():
    stats[f'{k}/mean'], stats[f'{k}/std'] = v.mean(), v.std()
  stats['total/mean'], stats['total/std'] = total_n.mean(), total_n.std()
  stats['degenerate_groups'] = grpo.group_stats(
      total_n, group_size)['degenerate_groups']
  return jnp.asarray(adv_n, jnp.float32), stats
