"""cmr-jax: learning cardiac function (LVEF) from cine cardiac MRI with JAX/Flax."""

import os as _os

__version__ = "0.1.0"

# XLA flags this package sets unless XLA_FLAGS already names them (the user's setting wins). They
# take effect when jax starts its backend, so importing cmr_jax before the first computation is
# enough (jax reads XLA_FLAGS then, not at import).
# - The CPU backend's concurrency-optimised scheduler orders a step's kernels so that independent
#   ones can run at once; with a few cores the extra live buffers cost more than the overlap gains:
#   the MViT-B 16x4 training step runs 1.3x faster without it on the 2-core CPU (README "Step speed
#   options"), values bit for bit the same. CPU only (every jaxlib >= 0.6 knows the flag).
DEFAULT_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def add_xla_flags(flags: tuple[str, ...] | list[str]) -> None:
  """Appends each `--name=value` of `flags` to XLA_FLAGS unless XLA_FLAGS already names it."""
  current = _os.environ.get("XLA_FLAGS", "")
  extra = [f for f in flags if f.split("=")[0] not in current]
  if extra:
    _os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


add_xla_flags(DEFAULT_XLA_FLAGS)
