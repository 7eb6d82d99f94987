"""The shapes world: a procedural, fully verifiable stand-in for web data.

Scenes of 1-4 coloured shapes (`scene`), generation prompts with GenEval
specs (`spec`), understanding questions and captions (`questions`), a
detector (`detector`; its `detect` is re-exported as `world.detect`),
GenEval's rules (`verify`), a tokenizer, splits with held-out compositions
(`examples`) and a TFDS builder (`dataset`).
"""

from lvrpo_jax.world.detector import UNKNOWN, Detection, detect
from lvrpo_jax.world.objects import (BACKGROUND, COLORS, IMAGE_SIZES, LAYOUTS,
                                     PALETTE, SHAPES)
from lvrpo_jax.world.scene import Scene, SceneObject, render
from lvrpo_jax.world.spec import TAGS, Spec, parse_prompt, prompt
from lvrpo_jax.world.tokenizer import Tokenizer
from lvrpo_jax.world.verify import Verdict, geneval_scores, verify

__all__ = [
    'BACKGROUND', 'COLORS', 'Detection', 'IMAGE_SIZES', 'LAYOUTS', 'PALETTE',
    'SHAPES', 'Scene', 'SceneObject', 'Spec', 'TAGS', 'Tokenizer', 'UNKNOWN',
    'Verdict', 'detect', 'geneval_scores', 'parse_prompt', 'prompt', 'render',
    'verify',
]
