"""Group rollouts: replays equal the rollouts' log-probs at unchanged
parameters (every cfg_mode), and the shared-prefix replay equals the full
sequence forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvrpo_jax.models import presets
from lvrpo_jax.models import sampling
from lvrpo_jax.models import unified
from lvrpo_jax.rl import flow
from lvrpo_jax.rl import rollout
from lvrpo_jax.world import tokenizer as tok

V = tok.Tokenizer().vocab_size
CFG = presets.micro()
B, G = 2, 3


@pytest.fixture(scope='module')
def model():
  m = unified.UnifiedModel(CFG, rngs=nnx.Rngs(0))
  # A non-zero velocity head, so the velocity depends on the parameters.
  head = m.velocity_out
  head.kernel[...] = jax.random.normal(jax.random.key(1),
                                       head.kernel.shape) * 0.3
  return m


def _understanding_inputs():
  rng = np.random.default_rng(0)
  pixels = jnp.asarray(rng.uniform(-1, 1, (B, 32, 32, 3)), jnp.float32)
  questions = rng.integers(len(tok.SPECIALS), V, (B, 5))
  questions[1, :2] = tok.PAD  # Left-padded.
  return pixels, jnp.asarray(questions, jnp.int32)


@pytest.mark.parametrize('temperature', [1.0, 0.7])
def test_answer_replay_equals_the_rollout(model, temperature):
  pixels, questions = _understanding_inputs()
  keys = jax.random.split(jax.random.key(2), B * G)
  out = jax.jit(lambda m, p, q, k: rollout.answer_rollout(
      m, p, q, k, group=G, num_tokens=4, temperature=temperature))(
          model, pixels, questions, keys)
  assert out['tokens'].shape == (B * G, 4)
  # An untrained model stops at <eos> rarely; the mask is still exercised
  # where it does, and padding after it has log-prob 0.
  assert np.all(np.asarray(out['logp'])[~np.asarray(out['mask'])] == 0)
  replay = jax.jit(lambda m, p, q, t, k: rollout.answer_logprobs(
      m, p, q, t, k, group=G, temperature=temperature))(
          model, pixels, questions, out['tokens'], out['mask'])
  np.testing.assert_allclose(replay, out['logp'], atol=1e-5)


def test_answer_replay_equals_the_full_sequence_forward(model):
  pixels, questions = _understanding_inputs()
  rng = np.random.default_rng(3)
  answers = jnp.asarray(rng.integers(len(tok.SPECIALS), V, (B * G, 3)),
                        jnp.int32)
  mask = jnp.ones(answers.shape, bool)
  replay = jax.jit(lambda m: rollout.answer_logprobs(
      m, pixels, questions, answers, mask, group=G, temperature=1.0))(model)

  @jax.jit
  def reference(model):
    # Each sample's question + answer as one causal sequence, no cache and
    # no sharing.
    text = jnp.concatenate([jnp.repeat(questions, G, 0), answers], axis=1)
    logits = model.understanding_logits(jnp.repeat(pixels, G, 0), text)
    q = questions.shape[1]
    logp = jax.nn.log_softmax(logits[:, q - 1:-1], axis=-1)
    return jnp.take_along_axis(logp, answers[..., None], axis=-1)[..., 0]

  np.testing.assert_allclose(replay, reference(model), atol=1e-5)


def _prompts():
  prompts = np.random.default_rng(4).integers(len(tok.SPECIALS), V, (B, 6))
  prompts[0, :3] = tok.PAD
  return jnp.asarray(prompts, jnp.int32)


@pytest.mark.parametrize('cfg_mode, guidance', [
    ('none', 1.0), ('cond_only', 1.0), ('guided', 3.0),
    ('guided', sampling.Guidance(3.0, interval=(0.5, 1.0), renorm_min=0.0))])
def test_image_replay_equals_the_rollout(model, cfg_mode, guidance):
  kwargs = dict(group=G, noise_level=0.7, cfg_mode=cfg_mode,
                guidance=guidance)
  out = jax.jit(lambda m, p, r: rollout.image_rollout(
      m, p, r, num_steps=5, **kwargs))(model, _prompts(),
                                       jax.random.split(jax.random.key(5),
                                                        B * G))
  assert out['states'].shape == (B * G, 5, 4, 4, 4)
  np.testing.assert_array_equal(out['next_states'][:, :-1],
                                out['states'][:, 1:])
  logp, means, stds = jax.jit(lambda m, p, s, ns: rollout.image_logprobs(
      m, p, s, ns, **kwargs))(model, _prompts(), out['states'],
                              out['next_states'])
  np.testing.assert_allclose(logp, out['logp'], atol=1e-5)
  assert means.shape == out['states'].shape
  assert stds.shape == (B * G, 5)
  # Replaying K = 2 of the 5 transitions, each sample its own: the same
  # log-probs and means as the full replay there.
  steps = flow.transition_subsets(
      jax.random.split(jax.random.key(9), B * G), 5, 2)
  part = rollout.select_transitions(out, steps)
  assert part['states'].shape == (B * G, 2, 4, 4, 4)
  got = jax.jit(lambda m, p, s, ns, st: rollout.image_logprobs(
      m, p, s, ns, num_steps=5, steps_nk=st, **kwargs))(
          model, _prompts(), part['states'], part['next_states'], steps)
  take = jax.vmap(lambda row, i: row[i])
  np.testing.assert_allclose(got[0], part['logp'], atol=1e-5)
  np.testing.assert_allclose(got[0], take(logp, steps), atol=1e-6)
  np.testing.assert_allclose(got[1], take(means, steps), atol=1e-6)
  np.testing.assert_allclose(got[2], take(stds, steps), rtol=1e-6)


def test_guided_rollout_samples_the_guided_velocity(model):
  # With the SDE noise at ~0 the rollout is the Euler ODE of the guided
  # velocity, i.e. sampling.sample_latents with guidance.
  prompts = _prompts()
  keys = jax.random.split(jax.random.key(6), B)
  out = rollout.image_rollout(model, prompts, keys, group=1, num_steps=4,
                              noise_level=1e-7, cfg_mode='guided',
                              guidance=3.0)
  # Each sample's x_1 comes from the first half of its key.
  noise = jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[0],
                                               (4, 4, 4)))(keys)
  want = sampling.sample_latents(
      sampling.recomputed_velocity(model, prompts, 3.0), noise, 4,
      CFG.timestep_shift)
  np.testing.assert_allclose(out['latents'], want, atol=1e-4)


def test_a_group_samples_differently_from_one_prompt(model):
  out = rollout.image_rollout(model, _prompts(),
                              jax.random.split(jax.random.key(7), B * G),
                              group=G,
                              num_steps=3, noise_level=0.7, cfg_mode='none',
                              guidance=1.0)
  latents = np.asarray(out['latents'])
  assert not np.allclose(latents[0], latents[1])


@pytest.mark.parametrize('context_grad', [True, False])
def test_image_loss_reaches_the_context_only_when_asked(model, context_grad):
  kwargs = dict(group=G, noise_level=0.7, cfg_mode='none', guidance=1.0)
  out = jax.jit(lambda m: rollout.image_rollout(
      m, _prompts(), jax.random.split(jax.random.key(8), B * G),
      num_steps=2, **kwargs))(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def total(params):
    m = nnx.merge(graphdef, params, rest)
    return rollout.image_logprobs(m, _prompts(), out['states'],
                                  out["next_states"],
                                  context_grad=context_grad,
                                  **kwargs)[0].sum()

  grads = jax.jit(jax.grad(total))(params)
  layer = grads['mot']['layers'][0]
  und = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(layer['und']))
  gen = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(layer['gen']))
  assert gen > 0
  assert (und > 0) == context_grad
