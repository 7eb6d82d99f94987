"""The algorithm: GRPO math, flow-matching transitions, rollouts, rewards
(pure functions)."""
