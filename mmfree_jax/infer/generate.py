"""Autoregressive generation for both arches, fully on device."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmfree_jax.config import ModelConfig
from mmfree_jax.infer.sampling import Sampling, SamplingError, sample
from mmfree_jax.models import LM, init_cache

# `generate` compiles one function: a prefill over the longest multiple of 8 tokens shorter
# than every prompt, then a `lax.while_loop` that feeds one token per step, carrying the decode state
# ([L, B, d] float32 for mmfree, the KV cache for the transformer). Prompts of different
# lengths need no padding inside the sequence: while a row is still inside its prompt the
# loop feeds its next prompt token instead of the sampled one, so every row sees exactly
# its own tokens at positions 0, 1, ... and its result equals that of the prompt alone
# (up to float rounding: the prefill length depends on the shortest prompt of the batch).
# Each row stops at `eos_id` (then pad) or after `max_new_tokens`; the loop exits early
# when every row is done.
#
# `stream` is the host-driven variant for one prompt: it yields tokens as they come.
# Params may be latent (`models.LM`) or packed (`interop.packed`).
#
#     out = generate(cfg, params, [[1, 15, 27], [1, 9]], 32, Sampling(temperature=0.8, top_p=0.9))
#     out.tokens  # [B, 32] int32, pad after eos


def model_forward(cfg: ModelConfig, params: Any, tokens_BxT: jax.Array,
                  cache: dict | None = None,
                  segment_ids_BxT: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
  """`(logits_BxTxV, new_cache)` from latent or packed params (`interop.packed`: the model
  takes each packed kernel as its ternary codes and scale)."""
  return LM(cfg).apply({"params": params}, tokens_BxT, segment_ids_BxT, cache)


forward_jit = jax.jit(model_forward, static_argnums=0)


@dataclasses.dataclass
class Generation:
  tokens: np.ndarray  # [B, max_new] int32: generated ids, `pad_id` after eos
  lengths: np.ndarray  # [B] generated tokens per row, eos included

  def row(self, b: int) -> list[int]:
    return self.tokens[b, : self.lengths[b]].tolist()


BUCKET = 8  # prompt widths and prefill lengths are multiples of this (fewer compiles)


def _round_up(n: int, m: int = BUCKET) -> int:
  return -(-n // m) * m


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int,
                pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded [B, S] int32 tokens (S a multiple of BUCKET) and the [B] lengths."""
  if not prompts:
    raise SamplingError("no prompts given; pass at least one prompt")
  lens = np.array([len(p) for p in prompts], np.int32)
  if lens.min() < 1:
    raise SamplingError("every prompt needs at least one token (e.g. bos)")
  out = np.full((len(prompts), _round_up(int(lens.max()))), pad_id, np.int32)
  for b, p in enumerate(prompts):
    out[b, : len(p)] = p
  ids = np.concatenate([np.asarray(p, np.int64) for p in prompts])
  if ids.max() >= vocab_size or ids.min() < 0:
    raise SamplingError(f"prompt token id out of range [0, {vocab_size}); check that the "
                        "tokenizer matches the model")
  return out, lens


def prefill_length(min_prompt_len: int) -> int:
  """Tokens run as one prefill: a multiple of BUCKET below the shortest prompt; the rest of
  each prompt (< BUCKET + its extra length) is fed by the decode loop."""
  return (min_prompt_len - 1) // BUCKET * BUCKET


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "prefill_len", "max_new"))
def _generate(params, tokens_BxS, lens_B, rng, eos_id, pad_id, *, cfg: ModelConfig,
              sampling: Sampling, prefill_len: int, max_new: int):
  b, s = tokens_BxS.shape
  total = s + max_new
  buf = jnp.full((b, total), pad_id, jnp.int32).at[:, :s].set(tokens_BxS)
  end_B = lens_B + max_new
  cache = init_cache(cfg, b, total)
  if prefill_len:
    _, cache = model_forward(cfg, params, buf[:, :prefill_len], cache)

  def cond(c):
    pos, _, done_B, _ = c
    return (pos + 1 < total) & ~jnp.all(done_B)

  def body(c):
    """Feeds the token at `pos`, then fixes the token at `pos + 1`."""
    pos, buf, done_B, cache = c
    logits, cache = model_forward(cfg, params, buf[:, pos][:, None], cache)
    nxt = pos + 1
    sampled = sample(logits[:, -1], jax.random.fold_in(rng, nxt), sampling)
    in_prompt = nxt < lens_B
    active = ~in_prompt & ~done_B
    tok = jnp.where(in_prompt, buf[:, nxt], jnp.where(active, sampled, pad_id))
    done_B = done_B | (active & (tok == eos_id)) | (nxt + 1 >= end_B)
    return nxt, buf.at[:, nxt].set(tok), done_B, cache

  init = (jnp.int32(prefill_len), buf, jnp.zeros((b,), bool), cache)
  _, buf, _, _ = jax.lax.while_loop(cond, body, init)
  return jax.vmap(lambda row, n: jax.lax.dynamic_slice(row, (n,), (max_new,)))(buf, lens_B)


def _lengths(tokens_BxN: np.ndarray, eos_id: int | None) -> np.ndarray:
  n = tokens_BxN.shape[1]
  if eos_id is None:
    return np.full(tokens_BxN.shape[0], n, np.int32)
  is_eos = tokens_BxN == eos_id
  return np.where(is_eos.any(1), is_eos.argmax(1) + 1, n).astype(np.int32)


def generate(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, sampling: Sampling = Sampling(), eos_id: int | None = None,
             pad_id: int = 0, seed: int = 0) -> Generation:
  """Generates `max_new_tokens` per prompt (token ids) on device; see module docstring."""
  if max_new_tokens < 1:
    raise SamplingError(f"max_new_tokens={max_new_tokens} must be >= 1")
  tokens, lens = pad_prompts(prompts, cfg.vocab_size, pad_id)
  out = _generate(params, jnp.asarray(tokens), jnp.asarray(lens), jax.random.key(seed),
                  jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id), cfg=cfg,
                  sampling=sampling, prefill_len=prefill_length(int(lens.min())),
                  max_new=int(max_new_tokens))
  out = np.asarray(out)
  return Generation(out, _lengths(out, eos_id))


def stream(cfg: ModelConfig, params: Any, prompt: Sequence[int], max_new_tokens: int,
           sampling: Sampling = Sampling(), eos_id: int | None = None,
           seed: int = 0) -> Iterator[int]:
  """Yields generated token ids one at a time (host loop; same tokens as `generate`)."""
  if max_new_tokens < 1:
    raise SamplingError(f"max_new_tokens={max_new_tokens} must be >= 1")
  tokens, _ = pad_prompts([prompt], cfg.vocab_size)
  n = len(prompt)
  rng = jax.random.key(seed)
  cache = init_cache(cfg, 1, _round_up(n + max_new_tokens, 8 * BUCKET))
  p = prefill_length(n)
  if p:
    _, cache = forward_jit(cfg, params, jnp.asarray(tokens[:, :p]), cache)
  for pos in range(p, n - 1):
    _, cache = forward_jit(cfg, params, jnp.asarray(tokens[:, pos:pos + 1]), cache)
  tok = jnp.asarray(tokens[:, n - 1])
  for i in range(max_new_tokens):
    logits, cache = forward_jit(cfg, params, tok[:, None], cache)
    tok = _sample_jit(logits[:, -1], jax.random.fold_in(rng, n + i), sampling)
    t = int(tok[0])
    yield t
    if t == eos_id:
      return


_sample_jit = jax.jit(sample, static_argnums=2)
