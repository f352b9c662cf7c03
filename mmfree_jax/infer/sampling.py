"""Next-token choice: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


class SamplingError(ValueError):
  """Bad sampling settings; the message says which and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 = greedy; top_k 0 = off; top_p 1 = off (hashable: a jit static arg)."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise SamplingError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
    if self.top_k < 0:
      raise SamplingError(f"top_k={self.top_k} must be >= 0 (0 = off)")
    if not 0.0 < self.top_p <= 1.0:
      raise SamplingError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")


def filter_logits(logits_BxV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets logits outside the top-k / top-p nucleus to -inf (always keeps the argmax)."""
  x = logits_BxV.astype(jnp.float32)
  if top_k and top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, top_k)[0][:, -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(x, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep = before < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < cutoff, -jnp.inf, x)
  return x


def sample(logits_BxV: jax.Array, rng: jax.Array, s: Sampling) -> jax.Array:
  """Token ids [B] (int32)."""
  if s.temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  x = filter_logits(logits_BxV / s.temperature, s.top_k, s.top_p)
  return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)
