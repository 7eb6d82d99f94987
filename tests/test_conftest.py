"""Checks the test session setup in conftest.py."""

import jax
import jax.numpy as jnp


def test_eight_fake_devices():
  assert jax.device_count() == 8


def test_persistent_compilation_cache_keeps_every_entry():
  assert jax.config.jax_compilation_cache_dir
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
  assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
  # A compile goes through the cache without error.
  assert int(jax.jit(lambda x: x + 1)(jnp.int32(1))) == 2
