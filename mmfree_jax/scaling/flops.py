"""Moved to `mmfree_jax.flops`; this name stays only until `aot` imports it from there."""
from mmfree_jax.flops import *  # noqa: F401,F403
