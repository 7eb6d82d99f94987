"""lvrpo_jax: LVRPO post-training of unified multimodal models in JAX/Flax.

GRPO driven by language-visual rewards, for a model that both understands and
generates images; run it with `python -m lvrpo_jax.main` (see configs/base.py).
"""

__version__ = '0.1.0'
