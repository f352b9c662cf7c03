"""Log-likelihoods of token sequences, batched and jitted (the core of every eval)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmfree_jax.config import ModelConfig
from mmfree_jax.infer.generate import model_forward
from mmfree_jax.models import init_cache

# `Scorer.loglikelihood` scores (context, continuation) token pairs the way
# lm-evaluation-harness does: sum of log p(continuation | context) and whether the
# continuation is the greedy one. Requests are sorted by length, right-padded to a
# length bucket and run in fixed-size batches (one compile per bucket).
#
# `Scorer.rolling_nll` scores a whole token stream: the mmfree model carries its
# recurrent state from chunk to chunk (exact full-context likelihood at constant memory);
# the transformer scores disjoint windows of `max_length` tokens, each with one token of
# context (lm-eval's `loglikelihood_rolling` convention).


class EvalError(ValueError):
  """Bad evaluation input; the message names the problem and the fix."""


@functools.partial(jax.jit, static_argnums=0)
def target_logprobs(cfg: ModelConfig, params: Any, inputs_BxT: jax.Array, targets_BxT: jax.Array,
                    cache: dict | None = None):
  """(log p(target_t | inputs_<=t) [B,T], target is argmax [B,T], new cache)."""
  logits, cache = model_forward(cfg, params, inputs_BxT, cache)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  lp = jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]
  return lp, jnp.argmax(logits, axis=-1) == targets_BxT, cache


def _bucket(n: int, cap: int) -> int:
  return min(cap, max(16, 1 << (n - 1).bit_length()))


@dataclasses.dataclass
class Scorer:
  """Scores token sequences with one model. `max_length` = tokens per forward pass."""

  cfg: ModelConfig
  params: Any
  batch_size: int = 8
  max_length: int = 2048

  def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
                    ) -> list[tuple[float, bool]]:
    """[(sum log p(cont | ctx), cont is greedy)] per (ctx ids, cont ids); ctx non-empty."""
    seqs = []
    for i, (ctx, cont) in enumerate(requests):
      if not ctx or not cont:
        raise EvalError(f"request {i} has an empty context or continuation; prepend bos to "
                        "the context and score at least one token")
      if len(cont) > self.max_length:
        raise EvalError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length="
                        f"{self.max_length}; raise max_length")
      seq = (list(ctx) + list(cont))[-(self.max_length + 1):]  # keep the end, as lm-eval
      seqs.append((seq, len(cont)))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      t = _bucket(len(seqs[idx[0]][0]) - 1, self.max_length)
      inputs = np.zeros((self.batch_size, t), np.int32)
      targets = np.zeros((self.batch_size, t), np.int32)
      for r, i in enumerate(idx):
        seq = seqs[i][0]
        inputs[r, : len(seq) - 1] = seq[:-1]
        targets[r, : len(seq) - 1] = seq[1:]
      lp, greedy, _ = target_logprobs(self.cfg, self.params, jnp.asarray(inputs),
                                      jnp.asarray(targets))
      lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
      for r, i in enumerate(idx):
        seq, n_cont = seqs[i]
        sl = slice(len(seq) - 1 - n_cont, len(seq) - 1)
        out[i] = (float(lp[r, sl].sum()), bool(greedy[r, sl].all()))
    return out

  def rolling_nll(self, tokens: Sequence[int]) -> tuple[float, int]:
    """(negative log-likelihood of tokens[1:] given their prefix, number of scored tokens)."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.size < 2:
      raise EvalError("rolling_nll needs at least 2 tokens (bos + text)")
    n = tokens.size - 1
    c = min(self.max_length, _bucket(n, self.max_length))
    carry = self.cfg.arch == "mmfree"
    cache = init_cache(self.cfg, 1) if carry else None
    nll = 0.0
    for s in range(0, n, c):
      m = min(c, n - s)
      inputs = np.zeros((1, c), np.int32)
      targets = np.zeros((1, c), np.int32)
      inputs[0, :m] = tokens[s:s + m]
      targets[0, :m] = tokens[s + 1:s + m + 1]
      lp, _, new_cache = target_logprobs(self.cfg, self.params, jnp.asarray(inputs),
                                         jnp.asarray(targets), cache)
      nll -= float(np.asarray(lp, np.float64)[0, :m].sum())
      cache = new_cache if carry else None
    return nll, n
