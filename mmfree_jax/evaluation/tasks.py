"""Zero-shot multiple-choice tasks over local JSONL files, scored like lm-eval-harness.

Each line of a task file is one document. Accepted fields (the Hugging Face dataset
rows as published, or the simplified form `{"question": str, "choices": [str], "label":
int}` for the ARC/OBQA family):

| task | fields | context | continuation |
|---|---|---|---|
| arc_easy, arc_challenge | question, choices{text,label}, answerKey | "Question: {q}\\nAnswer:" | " {choice}" |
| openbookqa | question_stem, choices{text,label}, answerKey | "{question_stem}" | " {choice}" |
| piqa | goal, sol1, sol2, label (0/1) | "Question: {goal}\\nAnswer:" | " {sol}" |
| hellaswag | activity_label, ctx_a, ctx_b (or ctx), endings[4], label | preprocess("{activity_label}: {ctx_a} {ctx_b.capitalize()}") | " {preprocess(ending)}" |
| winogrande | sentence (with one "_"), option1, option2, answer ("1"/"2") | sentence[:blank] + option | " " + sentence[blank+1:].strip() |

WinoGrande uses partial scoring: the continuation after the blank is scored given each
option-filled prefix. `acc` = argmax of the summed log-likelihood; `acc_norm` = argmax
of log-likelihood / length of the choice string in characters, exactly what lm-eval
computes (`len(choice)`, = bytes for ASCII; `norm="bytes"` uses UTF-8 bytes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Sequence

import numpy as np

from mmfree_jax.evaluation.scoring import EvalError, Scorer


@dataclasses.dataclass(frozen=True)
class MCDoc:
  """One question: a context per choice (same string unless partial scoring)."""

  contexts: tuple[str, ...]
  continuations: tuple[str, ...]
  gold: int
  choices: tuple[str, ...]  # what acc_norm normalizes by (lm-eval's doc_to_choice)


def _key_index(doc: dict, labels: Sequence[str]) -> int:
  key = str(doc["answerKey"]).strip()
  if key not in labels:
    raise EvalError(f"answerKey {key!r} is not one of the choice labels {list(labels)}")
  return list(labels).index(key)


def _choices_and_gold(doc: dict) -> tuple[list[str], int]:
  ch = doc["choices"]
  if isinstance(ch, dict):
    return list(ch["text"]), _key_index(doc, ch["label"])
  return list(ch), int(doc["label"])


def _plain(context: str, choices: list[str], gold: int) -> MCDoc:
  return MCDoc((context,) * len(choices), tuple(" " + c for c in choices), gold, tuple(choices))


def arc(doc: dict) -> MCDoc:
  choices, gold = _choices_and_gold(doc)
  return _plain(f"Question: {doc['question']}\nAnswer:", choices, gold)


def openbookqa(doc: dict) -> MCDoc:
  choices, gold = _choices_and_gold(doc)
  return _plain(doc["question_stem"] if "question_stem" in doc else doc["question"], choices, gold)


def piqa(doc: dict) -> MCDoc:
  return _plain(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def hellaswag_preprocess(text: str) -> str:
  text = text.strip().replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)
  return text.replace("  ", " ")


def hellaswag(doc: dict) -> MCDoc:
  if "ctx_a" in doc:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
  else:
    ctx = doc["ctx"]
  label = doc.get("activity_label")
  query = hellaswag_preprocess(f"{label}: {ctx}" if label else ctx)
  return _plain(query, [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def winogrande(doc: dict) -> MCDoc:
  sentence = doc["sentence"]
  if sentence.count("_") != 1:
    raise EvalError(f"winogrande sentence needs exactly one '_' blank: {sentence!r}")
  idx = sentence.index("_")
  contexts = tuple(sentence[:idx] + doc[o] for o in ("option1", "option2"))
  target = " " + sentence[idx + 1:].strip()
  return MCDoc(contexts, (target, target), {"1": 0, "2": 1}[str(doc["answer"])], contexts)


TASKS: dict[str, Callable[[dict], MCDoc]] = {
    "arc_easy": arc, "arc_challenge": arc, "openbookqa": openbookqa, "obqa": openbookqa,
    "piqa": piqa, "hellaswag": hellaswag, "winogrande": winogrande,
}


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
  if not os.path.isfile(path):
    raise EvalError(f"task file {path!r} not found")
  docs = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          docs.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise EvalError(f"{path}:{n} is not valid JSON ({e})") from None
      if limit and len(docs) >= limit:
        break
  return docs


def load_task(name: str, path: str | os.PathLike, limit: int | None = None) -> list[MCDoc]:
  """Documents of task `name` from a JSONL file."""
  return parse_task(name, read_jsonl(path, limit), path)


def parse_task(name: str, raw: Sequence[dict], path: str | os.PathLike) -> list[MCDoc]:
  """Documents of task `name` from the JSON objects `raw` of file `path`."""
  if name not in TASKS:
    raise EvalError(f"unknown task {name!r}; use one of {sorted(TASKS)}")
  out = []
  for n, doc in enumerate(raw, 1):
    try:
      out.append(TASKS[name](doc))
    except (KeyError, TypeError, ValueError) as e:
      raise EvalError(f"{path}: document {n} is not in {name} format (bad or missing field "
                      f"{e}); see mmfree_jax/evaluation/tasks.py for the expected fields") from None
  return out


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = True
                ) -> tuple[list[int], list[int]]:
  """Token ids (context, continuation) as lm-eval splits them: trailing spaces of the
  context move to the continuation; the continuation is `enc(ctx + cont)[len(enc(ctx)):]`."""
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    continuation = context[-n_spaces:] + continuation
    context = context[:-n_spaces]
  whole = tokenizer.encode(context + continuation)
  ctx = tokenizer.encode(context)
  prefix = [tokenizer.bos_id] if add_bos else ([] if ctx else [tokenizer.eos_id])
  return prefix + ctx, whole[len(ctx):]


def _preds(doc: MCDoc, ll: np.ndarray, norm: str) -> tuple[int, int]:
  """(argmax of log-likelihood, argmax of log-likelihood per choice length)."""
  lens = np.array([len(c.encode()) if norm == "bytes" else len(c) for c in doc.choices], float)
  return int(np.argmax(ll)), int(np.argmax(ll / lens))


def score_docs(docs: Sequence[MCDoc], lls: Sequence[float],
               norm: str = "chars") -> dict[str, float]:
  """acc and acc_norm from per-choice log-likelihoods laid out doc by doc."""
  acc = acc_norm = 0
  k = 0
  for doc in docs:
    n = len(doc.continuations)
    pred, pred_norm = _preds(doc, np.asarray(lls[k:k + n], np.float64), norm)
    k += n
    acc += int(pred == doc.gold)
    acc_norm += int(pred_norm == doc.gold)
  return {"acc": acc / len(docs), "acc_norm": acc_norm / len(docs), "n": len(docs)}


def samples(docs: Sequence[MCDoc], raw: Sequence[dict], results: Sequence[tuple[float, bool]],
            norm: str = "chars") -> list[dict[str, Any]]:
  """One record per document (lm-eval's --log_samples): the document, each choice's context,
  continuation, log-likelihood and greedy flag, the predictions and whether they are right."""
  out, k = [], 0
  for i, (doc, src) in enumerate(zip(docs, raw)):
    n = len(doc.continuations)
    res = results[k:k + n]
    k += n
    pred, pred_norm = _preds(doc, np.asarray([ll for ll, _ in res], np.float64), norm)
    out.append({"doc_id": i, "doc": src, "gold": doc.gold, "contexts": list(doc.contexts),
                "continuations": list(doc.continuations),
                "loglikelihoods": [ll for ll, _ in res], "is_greedy": [g for _, g in res],
                "pred": pred, "pred_norm": pred_norm, "acc": float(pred == doc.gold),
                "acc_norm": float(pred_norm == doc.gold)})
  return out


def evaluate(scorer: Scorer, tokenizer, name: str, path: str | os.PathLike,
             limit: int | None = None, add_bos: bool = True,
             log_samples: bool = False) -> dict[str, Any]:
  """{"acc", "acc_norm", "n", "acc_stderr"} of one task file, plus "samples" (see `samples`)
  with `log_samples`."""
  raw = read_jsonl(path, limit)
  docs = parse_task(name, raw, path)
  if not docs:
    raise EvalError(f"task file {path!r} has no documents")
  reqs = [encode_pair(tokenizer, c, x, add_bos)
          for d in docs for c, x in zip(d.contexts, d.continuations)]
  results = scorer.loglikelihood(reqs)
  res: dict[str, Any] = score_docs(docs, [ll for ll, _ in results])
  res["acc_stderr"] = math.sqrt(res["acc"] * (1 - res["acc"]) / max(len(docs) - 1, 1))
  if log_samples:
    res["samples"] = samples(docs, raw, results)
  return res
