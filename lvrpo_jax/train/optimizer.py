"""The optimizer of every stage: AdamW, warmup + cosine, global-norm clip.

Weight decay applies to matrices only (kernels and embeddings, ndim >= 2),
never to biases or norm scales, as is standard for transformers.
"""

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Names follow the usual symbols; `total_steps` includes the warmup."""
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  total_steps: int = 1000
  end_learning_rate_ratio: float = 0.1  # Cosine floor, relative to the peak.
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.01
  clip_norm: float = 1.0  # Global-norm clip; 0 disables it.

  def __post_init__(self):
    if not 0 <= self.warmup_steps < self.total_steps:
      raise ValueError(f'warmup_steps={self.warmup_steps} must be in '
                       f'[0, total_steps={self.total_steps})')
    if self.learning_rate <= 0 or self.clip_norm < 0:
      raise ValueError('learning_rate must be > 0 and clip_norm >= 0, got '
                       f'{self.learning_rate}, {self.clip_norm}')


def schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine down to the floor."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate,
      warmup_steps=cfg.warmup_steps, decay_steps=cfg.total_steps,
      end_value=cfg.learning_rate * cfg.end_learning_rate_ratio)


def decay_mask(params):
  """True for the leaves weight decay applies to (ndim >= 2)."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """clip -> AdamW(schedule, masked decay)."""
  adamw = optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  if cfg.clip_norm:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
  return adamw
