"""Inference: on-device generation (`generate`) and sampling (`sampling`), from latent or
2-bit packed weights. CLI: `python -m mmfree_jax.generate --help`.
"""
