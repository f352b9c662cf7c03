r"""Perplexity of a text or of JSONL documents: per token, per byte (bits per byte) and per word.

Each document is encoded with bos prepended; every token after bos is scored given all tokens
before it (mmfree: exact, state carried across chunks; transformer: windows of `max_length`,
see `scoring.Scorer.rolling_nll`). Bytes and words are counted as lm-evaluation-harness does
(`count_words`: `len(re.split(r"\s+", doc))`, empty strings at the ends included), and the
perplexities aggregate over documents as its weighted perplexity: exp(sum nll / sum units).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Sequence

from mmfree_jax.evaluation.scoring import EvalError, Scorer


def count_words(doc: str) -> int:
  """Words of `doc` as lm-eval counts them for word_perplexity."""
  return len(re.split(r"\s+", doc))


def perplexity_of_docs(scorer: Scorer, tokenizer, docs: Sequence[str]) -> dict[str, float]:
  """{"nll", "docs", "tokens", "bytes", "words", "token_perplexity", "bits_per_byte",
  "byte_perplexity", "word_perplexity"} over `docs`."""
  if not docs or not all(docs):
    raise EvalError("a text to score is empty")
  nll = n_tok = n_bytes = n_words = 0
  for doc in docs:
    d_nll, d_tok = scorer.rolling_nll([tokenizer.bos_id] + list(tokenizer.encode(doc)))
    nll += d_nll
    n_tok += d_tok
    n_bytes += len(doc.encode("utf-8"))
    n_words += count_words(doc)
  return {"nll": nll, "docs": len(docs), "tokens": n_tok, "bytes": n_bytes, "words": n_words,
          "token_perplexity": math.exp(nll / n_tok),
          "bits_per_byte": nll / n_bytes / math.log(2),
          "byte_perplexity": math.exp(nll / n_bytes),
          "word_perplexity": math.exp(nll / n_words)}


def perplexity_of_text(scorer: Scorer, tokenizer, text: str) -> dict[str, float]:
  """`perplexity_of_docs` of one document."""
  return perplexity_of_docs(scorer, tokenizer, [text])


def perplexity_of_file(scorer: Scorer, tokenizer, path: str | os.PathLike,
                       text_field: str = "text") -> dict[str, float]:
  """A .jsonl file: one document per line (its `text_field`); any other file: one document."""
  if not os.path.isfile(path):
    raise EvalError(f"text file {path!r} not found")
  with open(path, encoding="utf-8") as f:
    if not os.fspath(path).endswith(".jsonl"):
      return perplexity_of_text(scorer, tokenizer, f.read())
    docs = []
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          doc = json.loads(line)[text_field]
        except (ValueError, KeyError, TypeError):
          doc = None
        if not isinstance(doc, str):
          raise EvalError(f"{path}:{n} is not a JSON object with a {text_field!r} string")
        docs.append(doc)
  return perplexity_of_docs(scorer, tokenizer, docs)
