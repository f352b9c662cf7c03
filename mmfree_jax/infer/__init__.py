"""Inference: on-device generation (`generate`), sampling (`sampling`) and the forward pass
on 2-bit packed weights (`packed`). CLI: `python -m mmfree_jax.generate --help`.
"""
