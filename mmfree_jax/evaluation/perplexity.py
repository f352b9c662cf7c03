"""Perplexity of a text: per token, per byte (bits per byte) and per word.

The text is encoded once with bos prepended; every token after bos is scored given all
tokens before it (mmfree: exact, state carried across chunks; transformer: windows of
`max_length`, see `scoring.Scorer.rolling_nll`).
"""

from __future__ import annotations

import math
import os
import re

from mmfree_jax.evaluation.scoring import EvalError, Scorer


def perplexity_of_text(scorer: Scorer, tokenizer, text: str) -> dict[str, float]:
  """{"nll", "tokens", "bytes", "words", "token_perplexity", "bits_per_byte",
  "byte_perplexity", "word_perplexity"}."""
  if not text:
    raise EvalError("the text to score is empty")
  ids = [tokenizer.bos_id] + list(tokenizer.encode(text))
  nll, n_tok = scorer.rolling_nll(ids)
  n_bytes = len(text.encode("utf-8"))
  n_words = len(re.split(r"\s+", text.strip()))
  return {"nll": nll, "tokens": n_tok, "bytes": n_bytes, "words": n_words,
          "token_perplexity": math.exp(nll / n_tok),
          "bits_per_byte": nll / n_bytes / math.log(2),
          "byte_perplexity": math.exp(nll / n_bytes),
          "word_perplexity": math.exp(nll / n_words)}


def perplexity_of_file(scorer: Scorer, tokenizer, path: str | os.PathLike) -> dict[str, float]:
  if not os.path.isfile(path):
    raise EvalError(f"text file {path!r} not found")
  with open(path, encoding="utf-8") as f:
    return perplexity_of_text(scorer, tokenizer, f.read())
