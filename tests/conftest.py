"""Shared test set-up. Runs before any test module imports jax."""

import os

# Sharding tests need several devices; on CPU, XLA fakes them. Must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
