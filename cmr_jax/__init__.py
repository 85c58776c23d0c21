"""cmr-jax: learning cardiac function (LVEF) from cine cardiac MRI with JAX/Flax."""

__version__ = "0.1.0"
