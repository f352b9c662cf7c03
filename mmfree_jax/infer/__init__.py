"""Inference: on-device generation (`generate`), sampling (`sampling`) and 2-bit packed
ternary weights (`packed`). CLI: `python -m mmfree_jax.generate --help`.
"""
