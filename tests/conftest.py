"""Test session set-up: 8 simulated CPU devices, the persistent compile cache, shared tiny config."""
import os

# Before jax is imported anywhere: 8 simulated CPU devices for the sharding tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@pytest.fixture(scope="session")
def tiny_config():
  from ehrxdiff_jax.config_util import load_config
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return load_config(os.path.join(root, "configs", "tiny.py"))
