"""Test-wide JAX setup: 8 fake CPU devices and strict rank promotion.

XLA_FLAGS must be set before JAX initialises its backends, so this runs at import time of the test session.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
