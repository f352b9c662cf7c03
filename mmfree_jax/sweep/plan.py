"""A sweep's plan: per point sizes, tokens, FLOPs, tokens/param, epochs and planned time."""

from __future__ import annotations

from typing import Any, Sequence

from mmfree_jax.sweep.spec import Sweep, point_config


def plan(sw: Sweep, names: Sequence[str], sets: dict[str, Any] | None = None,
         corpus_tokens: float | None = None, peak_flops: float = 989e12) -> list[dict[str, Any]]:
  """Per point: sizes, tokens, FLOPs, tokens/param, epochs and planned single-H200 time.
  `corpus_tokens`: the corpus' train-split tokens (None: read the prepared corpus; 0: unknown)."""
  from mmfree_jax.models import param_counts  # noqa: PLC0415
  from mmfree_jax import flops as flops_lib  # noqa: PLC0415
  from mmfree_jax.train import setup  # noqa: PLC0415
  rows = []
  for n in names:
    c = point_config(sw, n, sets=sets)
    cfg = setup.model_config(c).replace(attention_impl="xla")  # counting compiles no kernel
    counts = param_counts(cfg)
    tokens = float(c.train.steps * c.train.batch_size * c.data.seq_len)
    ctok = (corpus_tokens if corpus_tokens is not None
            else setup.corpus_train_tokens(c, build=False))
    rows.append({
        "name": n, "params": counts["total"], "non_embedding_params": counts["non_embedding"],
        "tokens": tokens, "flops": flops_lib.train_flops(cfg, c.data.seq_len, tokens),
        "tokens_per_param": tokens / counts["non_embedding"],
        "epochs": tokens / ctok if ctok else None, "steps": c.train.steps,
        "planned_s": flops_lib.estimate_train_seconds(cfg, c.data.seq_len, tokens, peak_flops),
    })
  return rows


def _si(x: float) -> str:
  for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= div:
      return f"{x / div:.3g}{suffix}"
  return f"{x:.3g}"


def _duration(s: float) -> str:
  if s < 2 * 3600:
    return f"{s / 60:.1f} min"
  return f"{s / 3600:.1f} h" if s < 2 * 86400 else f"{s / 86400:.1f} days"


def format_plan(rows: list[dict[str, Any]]) -> str:
  head = ("point", "params", "non-emb", "tokens", "FLOPs", "tok/param", "epochs", "steps",
          "planned")
  lines = [head]
  for r in rows:
    ep = "?" if r["epochs"] is None else f"{r['epochs']:.2f}"
    lines.append((r["name"], _si(r["params"]), _si(r["non_embedding_params"]), _si(r["tokens"]),
                  f"{r['flops']:.2e}", f"{r['tokens_per_param']:.2f}",
                  ep, str(r["steps"]), _duration(r["planned_s"])))
  tot = sum(r["planned_s"] for r in rows)
  w = [max(len(l[i]) for l in lines) for i in range(len(head))]
  out = ["  ".join(v.rjust(w[i]) for i, v in enumerate(l)) for l in lines]
  return "\n".join(out + [f"total planned: {_duration(tot)} on one H200 (an estimate: "
                          "mmfree_jax.flops.planned_mfu)"])
