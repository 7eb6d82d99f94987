"""Launchers for lvrpo_jax runs: Cloud TPU VMs, GKE, Slurm-GPU and sweeps.

Each tool builds the exact shell commands (or the Job YAML / sbatch script)
and either prints them (`--dry-run`) or runs them. No training logic lives
here: every run is `python -m lvrpo_jax.main --config=... --workdir=...`.
"""
