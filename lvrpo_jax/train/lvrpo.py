"""The `lvrpo` stage: GRPO on both tasks with the language-visual rewards.

The policy and the frozen reference both start from the `pretrain`
baseline. Every step:
  rollout    `und_oversample * und_batch_size / G` (image, question)
             prompts of the train split -> G sampled answers each;
             `gen_oversample * gen_batch_size / G` generation prompts
             (train split, plus
             the held-out compositions for `heldout_fraction` of them:
             rewards need no paired image) -> G images each by the
             Flow-GRPO SDE sampler (ODE steps after an `sde_window`),
             decoded by the frozen `vae`; every log-prob recorded (pi_old);
             with `und_generated`, the images come first and that fraction
             of the answer prompts become questions about them, answered
             by what the world's detector reads
             (`image_questions.generated_questions`;
             with `und_generated_novel`, images showing a held-out
             composition first, asked about it; with
             `und_generated_paste`, their held-out objects pasted into
             the replaced rows' dataset images first);
  reward     answers: answer_match, format; images: r_ins (the world's
             detector and verifier against the prompt's spec), r_clean
             (the share of detected objects it classifies), r_exact
             (exactly the named number of objects), r_sem and
             r_dense (the frozen `reward_model`), r_kn (the frozen reference
             answering questions derived from the spec); advantages per
             group (`rewards.combine`, `reward_norm`); of each task's
             groups the `und_batch_size / G` or `gen_batch_size / G` most
             informative are kept (DAPO's dynamic sampling: a group whose
             samples all score the same has zero advantage and teaches
             nothing; the answers' questions about generated images may
             ask about any of the images sampled);
  reference  the reference's answer log-probs and transition means;
  update     mu optimizer updates of the clipped surrogate + beta KL (text:
             the `kl_estimator`; images: the exact Gaussian KL of the
             transitions), aggregated by `loss_agg`. With
             `sde_window` k, only an image's first k transitions were SDE
             steps (the rest ODE steps) and only those are replayed; with
             `train_transitions` K below that, each image's reference
             pass and update replay K of them, drawn per sample
             (Flow-GRPO's timestep fraction). With
             `pretrain_batch_size` > 0, the pretrain loss on that many train
             examples, times `pretrain_weight`, is added (PPO-ptx).
Multi-host: each process scores the samples its devices hold, then every
process gathers all the rewards (`lvrpo_jax.multihost`), so advantages are
computed identically everywhere; a sample's randomness is keyed by its
prompt's id (`sample_keys`), not by its row, so the result does not depend
on the process or device count.
Logged per step (means over the logging window): every reward component's
mean and std, degenerate groups, KL, clip fractions, ratio statistics, the
answers' entropy (the mean of -log pi over sampled tokens), the
replay-vs-rollout log-prob gap (0 up to float error at the first update),
the time of each phase, and per question family the answers' rewards
and the shares of groups sampled and kept (`lvrpo_groups`).
"""

import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvrpo_jax import configs
from lvrpo_jax import multihost
from lvrpo_jax.data import pipeline
from lvrpo_jax.models import presets
from lvrpo_jax.models import sampling
from lvrpo_jax.models import unified
from lvrpo_jax.models import vae as vae_lib
from lvrpo_jax.rl import flow
from lvrpo_jax.rl import grpo
from lvrpo_jax.rl import rewards as rewards_lib
from lvrpo_jax.rl import rollout
from lvrpo_jax.train import autoencoder
from lvrpo_jax.train import lvrpo_groups
from lvrpo_jax.train import lvrpo_prompts
from lvrpo_jax.train import lvrpo_schedule
from lvrpo_jax.train import pretrain
from lvrpo_jax.train import reward_model
from lvrpo_jax.train import stages
from lvrpo_jax.world import image_questions
from lvrpo_jax.world import questions as questions_lib
from lvrpo_jax.world import spec as spec_lib
from lvrpo_jax.world import stage as world_stage
from lvrpo_jax.world import tokenizer as tok

# Where each task's groups are logged by label: answers by question family,
# images by GenEval tag (sampled and kept shares, reward means).
LABEL_PREFIX = {'und': 'und/family', 'gen': 'gen/tag'}


def lvrpo_loss(model, batch, rng, *, c, pretrain_loss=None):
  """-J of both tasks: (loss, (1, aux)); `c` is config.lvrpo.

  With a 'pretrain' batch (`pretrain_batch_size` > 0), `pretrain_weight` x
  `pretrain_loss(model, batch['pretrain'], rng)`'s per-example mean is
  added: the supervised loss on dataset examples (InstructGPT's PPO-ptx).
  The tasks' losses are means already (each aggregated by `loss_agg`), so
  the step must not accumulate micro-batches (accum_steps is 1).
  """
  clip = dict(clip_eps_low=c.clip_eps_low, clip_eps_high=c.clip_eps_high,
              importance_level=c.importance_level)
  loss, aux = jnp.float32(0.0), {}
  if 'und' in batch:
    u = batch['und']
    logp = rollout.answer_logprobs(
        model, vae_lib.from_uint8(u['image']), u['question'], u['tokens'],
        u['mask'], group=c.group_size, temperature=c.temperature)
    (total, count), text_aux = grpo.policy_loss(
        logp, u['logp'], u['ref_logp'], u['adv'], u['mask'],
        kl_coef=c.kl_coef, kl_estimator=c.kl_estimator, loss_agg=c.loss_agg,
        **clip)
    loss += c.understanding_weight * total / count
    aux.update({f'und/{k}': v for k, v in text_aux.items()})
    aux['und/replay_gap'] = jnp.max(jnp.abs(logp - u['logp']))
  if 'gen' in batch:
    g = batch['gen']
    logp, means, stds = rollout.image_logprobs(
        model, g['prompt'], g['states'], g['next_states'],
        group=c.group_size, noise_level=c.noise_level, cfg_mode=c.cfg_mode,
        guidance=guidance_of(c), context_grad=c.gen_context_grad,
        num_steps=c.sample_steps, steps_nk=g.get('steps'))
    mask = jnp.ones(logp.shape, bool)
    loss_nt, image_aux = grpo.clipped_surrogate(logp, g['logp'], g['adv'],
                                                mask, **clip)
    kl_nt = jax.vmap(flow.velocity_kl, in_axes=1, out_axes=1)(
        means, g['ref_means'], stds)
    total, count = grpo.aggregate(loss_nt + c.kl_coef * kl_nt, mask,
                                  c.loss_agg)
    loss += total / count
    aux.update({f'gen/{k}': v for k, v in image_aux.items()})
    aux['gen/kl_mean'] = kl_nt.mean()
    aux['gen/replay_gap'] = jnp.max(jnp.abs(logp - g['logp']))
  if 'pretrain' in batch:  # Only the flow noise and prompt dropout use rng.
    total, (count, pretrain_aux) = pretrain_loss(model, batch['pretrain'],
                                                 rng)
    loss += c.pretrain_weight * total / count
    aux.update({f'pretrain/{k}': v for k, v in pretrain_aux.items()})
  return loss, (jnp.float32(1.0), aux)


def guidance_of(c) -> sampling.Guidance:
  """The rollouts' (and replays') guidance from the lvrpo config."""
  return sampling.Guidance(
      c.guidance, tuple(c.guidance_interval),
      c.guidance_renorm_min if c.guidance_renorm else None)


class Rollouts:
  """The jitted rollout and reference passes and the host-side rewards:
  `prepare(state, batch)` turns a batch of prompts into the update's batch
  (loop.run's `prepare` hook)."""

  def __init__(self, config, graphdef, rest, reference, ae, scorer,
               batch_sharding):
    self.c = c = config.lvrpo
    self.graphdef, self.rest = graphdef, rest
    self.ref_params = nnx.state(reference, nnx.Param)
    ae_graph, self.ae_state = nnx.split(ae)
    self.scorer = scorer
    self.batch_sharding = batch_sharding
    # Prompt- and sample-level arrays: rows over the data-parallel devices
    # (a prompt's G samples sit with it), so each process scores its own.
    self.rows = jax.sharding.NamedSharding(
        batch_sharding.mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
    self.base_key = jax.random.key(config.seed)
    self.seed, self.layout = config.seed, config.world.layout
    self.novel = (world_stage.world_and_sizes(config)[0].heldout
                  if c.und_generated_novel else None)
    self.tokenizer = tok.Tokenizer()
    self.last_ready = None
    image_kwargs = dict(group=c.group_size, noise_level=c.noise_level,
                        cfg_mode=c.cfg_mode, guidance=guidance_of(c))
    subset = lvrpo_schedule.replays_subset(c)
    sde_steps = lvrpo_schedule.sde_mask(c)

    # Two programs, not one: with `und_generated` the answers' images come
    # from the images sampled first. The keys are fold_in(rng, 0) for
    # answers and fold_in(rng, 1) for images either way.
    def sample_answers(params, u, rng):
      model = nnx.merge(graphdef, params, rest)
      return rollout.answer_rollout(
          model, vae_lib.from_uint8(u['image']), u['question'],
          sample_keys(jax.random.fold_in(rng, 0), u['index'], c.group_size),
          group=c.group_size, num_tokens=questions_lib.ANSWER_TOKENS,
          temperature=c.temperature)

    def sample_images(params, ae_state, g, rng):
      model = nnx.merge(graphdef, params, rest)
      gen = rollout.image_rollout(
          model, g['prompt'],
          sample_keys(jax.random.fold_in(rng, 1), g['index'], c.group_size),
          num_steps=c.sample_steps, sde_steps=sde_steps, **image_kwargs)
      decoder = nnx.merge(ae_graph, ae_state)
      gen['images'] = vae_lib.to_uint8(decoder.decode(
          decoder.denormalize_latents(gen.pop('latents'))))
      if subset:  # The transitions the reference and the update replay.
        gen = rollout.select_transitions(
            gen, lvrpo_schedule.replayed_transitions(c, sample_keys(
                jax.random.fold_in(rng, 2), g['index'], c.group_size)))
      return gen

    # The reference's log-probs (answers) and velocity means (images), one
    # program per task: with `und_first_steps` a step may train either.
    def refer_und(params, u, out):
      return rollout.answer_logprobs(
          nnx.merge(graphdef, params, rest), vae_lib.from_uint8(u['image']),
          u['question'], out['tokens'], out['mask'], group=c.group_size,
          temperature=c.temperature)

    def refer_gen(params, g, out):
      return rollout.image_logprobs(
          nnx.merge(graphdef, params, rest), g['prompt'], out['states'],
          out['next_states'], num_steps=c.sample_steps,
          steps_nk=out.get('steps'), **image_kwargs)[1]

    # One trace each for the whole run: a retrace would mean a shape or
    # static value changed between steps (and a recompile every step).
    self._sample_answers = jax.jit(
        chex.assert_max_traces(sample_answers, n=1), out_shardings=self.rows)
    self._sample_images = jax.jit(
        chex.assert_max_traces(sample_images, n=1), out_shardings=self.rows)
    self._refer = {task: jax.jit(chex.assert_max_traces(fn, n=1),
                                 out_shardings=self.rows)
                   for task, fn in (('und', refer_und), ('gen', refer_gen))}
    self._first = jax.jit(lambda tree: jax.tree.map(lambda x: x[0], tree),
                          out_shardings=self.rows)
    self._take = jax.jit(lambda tree, index: jax.tree.map(
        lambda x: x[index], tree), out_shardings=self.rows)
    self._as_batch = jax.jit(lambda tree: jax.tree.map(
        lambda x: x[None], tree), out_shardings=batch_sharding)

  def prepare(self, state, batch):
    """(state, prompt batch [1, b, ...]) -> (update batch, host metrics)."""
    times = {}
    jax.block_until_ready(state.params)  # The previous update, finished.
    start = time.perf_counter()
    if self.last_ready is not None:
      times['time/update'] = start - self.last_ready
    # The pretrain examples go to the update as they came, already in the
    # update's [1, b, ...] layout: only the prompts are unbatched.
    passed = {k: v for k, v in batch.items() if k == 'pretrain'}
    tasks = lvrpo_schedule.trained_tasks(self.c, int(state.step))
    # Images are sampled for the answers' questions about them even in a
    # step that trains answers only.
    sampled = {'gen'} if 'und' in tasks and self.c.und_generated else set()
    prompts = self._first({k: v for k, v in batch.items()
                           if k in tasks or k in sampled})
    rng = jax.random.fold_in(self.base_key, state.step)
    out, metrics = {}, {}
    if 'gen' in prompts:
      out['gen'] = self._sample_images(state.params, self.ae_state,
                                       prompts['gen'], rng)
    if 'und' in prompts:
      if self.c.und_generated > 0:
        und, counts = self._ask_about_images(prompts['und'], out['gen'],
                                             int(state.step))
        prompts = {**prompts, 'und': und}
        metrics.update(counts)
      out['und'] = self._sample_answers(state.params, prompts['und'], rng)
    if 'gen' not in tasks:
      prompts.pop('gen', None)
      out.pop('gen', None)
    out = jax.block_until_ready(out)
    times['time/rollout'] = time.perf_counter() - start
    start = time.perf_counter()
    # The groups' question families and GenEval tags, for the logs.
    labels = {
        'und': lvrpo_groups.family_labels(self._gathered(
            prompts['und']['family'])) if 'und' in prompts else None,
        'gen': lvrpo_groups.tag_labels(self._gathered(
            prompts['gen']['tag'])) if 'gen' in prompts else None}
    advantages, reward_metrics = self._rewards(prompts, out, labels)
    metrics.update(reward_metrics)
    if 'und' in prompts and self.c.und_oversample > 1:
      prompts, out, advantages, kept = self._keep_informative(
          'und', prompts, out, advantages, labels['und'])
      metrics.update(kept)
    if 'gen' in prompts and self.c.gen_oversample > 1:
      prompts, out, advantages, kept = self._keep_informative(
          'gen', prompts, out, advantages, labels['gen'])
      metrics.update(kept)
    advantages = {task: multihost.from_host(adv, self.rows)
                  for task, adv in advantages.items()}
    times['time/reward'] = time.perf_counter() - start
    start = time.perf_counter()
    ref = jax.block_until_ready({
        task: self._refer[task](self.ref_params, prompts[task], out[task])
        for task in prompts})
    times['time/reference'] = time.perf_counter() - start
    update = {}
    if 'und' in prompts:
      u = out['und']
      update['und'] = {**prompts['und'], 'tokens': u['tokens'],
                       'mask': u['mask'], 'logp': u['logp'],
                       'ref_logp': ref['und'], 'adv': advantages['und']}
      logp, _ = multihost.local_rows(u['logp'])
      mask, _ = multihost.local_rows(u['mask'])
      metrics['und/entropy'] = multihost.sum_over_processes(
          -logp.sum()) / max(multihost.sum_over_processes(mask.sum()), 1)
    if 'gen' in prompts:
      g = out['gen']
      update['gen'] = {'prompt': prompts['gen']['prompt'],
                       'states': g['states'],
                       'next_states': g['next_states'], 'logp': g['logp'],
                       'ref_means': ref['gen'], 'adv': advantages['gen']}
      if 'steps' in g:
        update['gen']['steps'] = g['steps']
    update = {**self._as_batch(update), **passed}
    self.last_ready = time.perf_counter()
    return update, {**metrics, **times}

  def _ask_about_images(self, und, gen, step: int):
    """The understanding prompts with the last `und_generated` of them
    replaced by questions about this step's generated images
    (`generated_questions`); returns (prompts, metrics): how many were
    replaced ('und/generated_prompts') and, with `und_generated_novel`, how
    many of those name a held-out composition ('und/novel_prompts').

    Every process computes the same replacement from all the images, so
    the batch does not depend on the process count.
    """
    prompts = und['index'].shape[0]
    count = round(self.c.und_generated * prompts)
    first = prompts - count  # The rows replaced: [first, prompts).
    images = multihost.gather_rows(*multihost.local_rows(gen['images']),
                                   gen['images'].shape[0])
    fields = {k: multihost.gather_rows(*multihost.local_rows(v), prompts)
              for k, v in und.items()}
    # (row, image, question, its id) of every replaced row.
    replaced = []
    if self.c.und_generated_paste and self.novel is not None:
      # A composite keeps its host's id: its other objects are the host's.
      replaced = [(first + row, image, q, fields['index'][first + row])
                  for row, image, q in self._pasted_questions(
                      images, fields['image'][first:], step)]
    pasted = len(replaced)
    free = sorted(set(range(first, prompts)) - {r[0] for r in replaced})
    asked = image_questions.generated_questions(
        images, len(free), (self.seed, step), self.layout, self.novel)
    replaced += [(row, images[j], q, lvrpo_prompts.GENERATED_IDS + j)
                 for row, (j, q) in zip(free[len(free) - len(asked):],
                                        asked)]
    counts = {'und/generated_prompts': float(len(replaced))}
    if self.novel is not None:
      counts['und/novel_prompts'] = float(sum(
          self.novel.names(q.pairs, q.relations) for _, _, q, _ in replaced))
    if self.c.und_generated_paste:
      counts['und/pasted_prompts'] = float(pasted)
    if not replaced:
      return und, counts
    for row, image, question, index in replaced:
      fields['index'][row] = index
      fields['image'][row] = image
      fields['question'][row] = self.tokenizer.encode_padded(
          question.text, questions_lib.QUESTION_LEN, left=True)
      fields['answer'][row] = self.tokenizer.encode_padded(
          question.answer, questions_lib.ANSWER_TOKENS, eos=True)
      fields['family'][row] = lvrpo_prompts.family_id(question.family)
    return ({k: multihost.from_host(v, self.rows) for k, v in fields.items()},
            counts)

  def _pasted_questions(self, images, hosts, step: int):
    """(host row, composite, question) for hosts with a novel object of
    `images` pasted in (`pasted_novel_objects`): a low-discrepancy
    `und_paste_contrast` of them asked the colour of another object
    (`contrast_questions`), the rest a question that names the novel one
    where the scene allows (`generated_questions`)."""
    pasted = image_questions.pasted_novel_objects(
        images, hosts, self.layout, self.novel, (self.seed, step, 1))
    contrast = [lvrpo_prompts.in_fraction(k, self.c.und_paste_contrast)
                for k in range(len(pasted))]
    named = [p for p, c in zip(pasted, contrast) if not c]
    other = [p for p, c in zip(pasted, contrast) if c]
    asked = [(named[k], q) for k, q in image_questions.generated_questions(
        [p[1] for p in named], len(named), (self.seed, step, 2),
        self.layout, self.novel, scenes=[p[2] for p in named])]
    asked += [(other[k], q) for k, q in image_questions.contrast_questions(
        [p[2] for p in other], self.novel, (self.seed, step, 3))]
    return [(row, image, q) for (row, image, _), q in asked]

  @staticmethod
  def _gathered(rows):
    """A row-sharded array, whole on every process (numpy)."""
    return multihost.gather_rows(*multihost.local_rows(rows), rows.shape[0])

  def _keep_informative(self, task, prompts, out, advantages, labels):
    """The `task`'s groups the update trains on: of the oversampled
    groups, its batch size / G with the largest total |advantage|
    (`lvrpo_groups.informative_groups`). Returns (prompts, out,
    advantages, metrics: how many kept groups are degenerate, all the
    same, and the `lvrpo_groups.label_shares` of the groups' `labels`
    [B])."""
    g = self.c.group_size
    keep = self.c[f'{task}_batch_size'] // g
    adv = advantages[task]
    ids = self._gathered(prompts[task]['index'])
    groups = lvrpo_groups.informative_groups(adv, g, keep, ids)
    rows = (groups[:, None] * g + np.arange(g)).ravel()
    prompts = {**prompts, task: self._take(prompts[task], groups)}
    out = {**out, task: self._take(out[task], rows)}
    advantages = {**advantages, task: adv[rows]}
    degenerate = np.all(adv[rows].reshape(-1, g) == 0, 1)
    return prompts, out, advantages, {
        f'{task}/kept_degenerate_groups': float(degenerate.sum()),
        **lvrpo_groups.label_shares(labels, groups, LABEL_PREFIX[task])}

  def _rewards(self, prompts, out, labels):
    """Rewards and group advantages of both tasks: each process scores its
    own samples on the host, then every process combines all the scores;
    the rewards are also logged per question family (answers) and GenEval
    tag (images): `labels` {task: [B] the groups' labels}.

    Returns:
      ({task: advantages [N] numpy, the same on every process}, metrics).
    """
    g = self.c.group_size
    scored = {}
    if 'und' in prompts:
      answers, samples = self._local(prompts['und']['answer'],
                                     out['und']['tokens'])
      truth = [self.tokenizer.decode(a) for a in answers]
      scored['und'] = (self.scorer.score_understanding(
          np.repeat(truth, g).tolist(), samples[0]), samples[1])
    if 'gen' in prompts:
      ids, images = self._local(prompts['gen']['prompt'],
                                out['gen']['images'])
      texts = [self.tokenizer.decode(p) for p in ids]
      specs = [spec_lib.parse_prompt(t) for t in texts]
      scored['gen'] = (self.scorer.score_generation(
          [s for s in specs for _ in range(g)],
          [t for t in texts for _ in range(g)], images[0]), images[1])
    advantages, metrics = {}, {}
    for task, ((components, errors), index) in scored.items():
      total = out[task]['logp'].shape[0]
      components = {k: multihost.gather_rows(v, index, total)
                    for k, v in components.items()}
      adv, stats = rewards_lib.combine(
          components, dict(self.c.rewards), g, self.c.reward_norm,
          scale_by_std=self.c.scale_by_std, std_level=self.c.std_level,
          scale_by_mean=task in self.c.scale_by_mean)
      advantages[task] = np.asarray(adv)
      metrics.update({f'{task}/{k}': float(v) for k, v in stats.items()})
      metrics.update(lvrpo_groups.label_means(
          components, np.repeat(np.asarray(labels[task], object), g),
          LABEL_PREFIX[task]))
      metrics.update({f'{task}/errors/{k}': multihost.sum_over_processes(v)
                      for k, v in errors.items()})
    return advantages, metrics

  def _local(self, prompts, samples):
    """This process's prompt rows [b, ...] and (its sample rows [b G, ...],
    their global indices): a prompt's samples sit on its devices."""
    g = self.c.group_size
    prompt_rows, prompt_index = multihost.local_rows(prompts)
    sample_rows, sample_index = multihost.local_rows(samples)
    if not np.array_equal(sample_index, (prompt_index[:, None] * g +
                                         np.arange(g)).ravel()):
      raise RuntimeError('a prompt and its samples are on different '
                         'processes; the rollout must keep them together')
    return prompt_rows, (sample_rows, sample_index)


def sample_keys(rng, ids_b, group: int):
  """[B G] keys: sample g of the prompt with id i draws from
  fold_in(fold_in(rng, i), g), wherever the prompt is in the batch."""
  per_prompt = unified.example_keys(rng, ids_b)
  return jax.vmap(lambda k: jax.vmap(lambda g: jax.random.fold_in(k, g))(
      jnp.arange(group)))(per_prompt).reshape(-1)


def run_lvrpo(config, workdir: str) -> None:
  """Trains the LVRPO policy (or resumes, or skips)."""
  train_lvrpo(config, workdir)


def train_lvrpo(config, workdir: str, require_complete: bool = False):
  """The stage's loop; needs complete vae, reward_model and pretrain."""
  c = config.lvrpo
  _check_batches(config)
  world, sizes = world_stage.world_and_sizes(config)
  data_dir = configs.world_data_dir(config, workdir)
  split = lambda name: pipeline.open_split(world, sizes, data_dir, name)
  ae = autoencoder.train_autoencoder(config, workdir, require_complete=True)
  reference = pretrain.train_baseline(config, workdir, require_complete=True)
  ucfg, _ = presets.from_config(config.model)

  def make_batches():
    iterators = {}
    g = c.group_size
    if c.und_batch_size:
      iterators['und'] = _batches(config, split('train'),
                                  lvrpo_prompts.UnderstandingPrompts(),
                                  c.und_batch_size * c.und_oversample // g)
    if c.gen_batch_size:
      prompts = lvrpo_prompts.generation_source(
          split('train'), lvrpo_prompts.HeldoutTail(
              split('heldout'), config.eval.heldout_examples),
          c.gen_tags, c.heldout_fraction)
      iterators['gen'] = _batches(config, prompts,
                                  lvrpo_prompts.GenerationPrompts(),
                                  c.gen_batch_size * c.gen_oversample // g)
    if c.pretrain_batch_size:
      iterators['pretrain'] = _batches(config, split('train'),
                                       pretrain.PretrainExamples(
                                           rationale=config.data
                                           .answer_rationale),
                                       c.pretrain_batch_size)
    return lvrpo_prompts.Zipped(**iterators)

  holder = {}
  pretrain_loss = pretrain.pretrain_loss_of(config.pretrain, ae)

  def prepare(state, batch):
    if 'rollouts' not in holder:
      holder['rollouts'] = _make_rollouts(config, workdir, reference, ae)
    return holder['rollouts'].prepare(state, batch)

  return stages.run(
      'lvrpo', config, workdir,
      make_model=lambda: unified.UnifiedModel(ucfg,
                                              rngs=nnx.Rngs(config.seed)),
      loss_fn=lambda m, b, r: lvrpo_loss(m, b, r, c=c,
                                         pretrain_loss=pretrain_loss),
      make_batches=make_batches, tokens_per_step=(
          c.und_batch_size + c.gen_batch_size + c.pretrain_batch_size),
      require_complete=require_complete, init_from=lambda: reference,
      prepare=prepare, updates_per_step=c.num_updates)


def _check_batches(config) -> None:
  """Each task's prompts per step must split over the data-parallel
  devices (prompt-level arrays are sharded like the samples), and so must
  the pretrain examples."""
  mesh = stages.mesh(config)
  ways = mesh.shape['data'] * mesh.shape['fsdp']
  for key in ('gen_batch_size', 'und_batch_size'):
    prompts = config.lvrpo[key] // config.lvrpo.group_size
    if prompts % ways:
      raise configs.ConfigError(
          f'lvrpo.{key}', f'{config.lvrpo[key]} samples are {prompts} '
          f'prompts of lvrpo.group_size={config.lvrpo.group_size}, which '
          f'do not split over {ways} data-parallel devices')
  if config.lvrpo.pretrain_batch_size % ways:
    raise configs.ConfigError(
        'lvrpo.pretrain_batch_size',
        f'{config.lvrpo.pretrain_batch_size} examples do not split over '
        f'{ways} data-parallel devices')


def _batches(config, source, transform, rows: int):
  """`rows` records per step, transformed (this process's share)."""
  return iter(pipeline.batches(
      source, batch_size=rows // jax.process_count(),
      seed=config.data.shuffle_seed, transforms=(transform,),
      worker_count=config.data.worker_count))


def _make_rollouts(config, workdir, reference, ae):
  """The rollout machinery, built at the first step (a complete stage that
  is only restored never needs the reward model)."""
  rm = reward_model.train_reward_model(config, workdir,
                                       require_complete=True)
  scorer = rewards_lib.Scorer(dict(config.lvrpo.rewards), dual_encoder=rm,
                              judge=reference,
                              reward_errors=config.lvrpo.reward_errors)
  graphdef, _, rest = nnx.split(reference, nnx.Param, ...)
  mesh = stages.mesh(config)
  batch_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, ('data', 'fsdp')))
  return Rollouts(config, graphdef, rest, reference, ae, scorer,
                  batch_sharding)
