"""Figures (matplotlib, Agg): paper Fig. 3 style scaling plot, loss curves, LR sensitivity,
LR schedules. Each function returns the Figure; `save(fig, stem)` writes stem.png + stem.pdf.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mmfree_jax.scaling import fit as fit_lib  # noqa: E402
from mmfree_jax.scaling import results as res_lib  # noqa: E402

COLORS = {"mmfree": "tab:red", "transformer": "tab:blue"}
LABELS = {"mmfree": "MatMul-free", "transformer": "Transformer++"}


def save(fig, stem: str) -> list[str]:
  """Writes `stem.png` and `stem.pdf`; returns the paths."""
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  paths = [f"{stem}.png", f"{stem}.pdf"]
  for p in paths:
    fig.savefig(p, dpi=150, bbox_inches="tight")
  return paths


def plot_scaling(analysis: dict[str, Any], paper: bool = False, power_law: bool = True,
                 title: str = "Final loss vs training compute"):
  """Loss vs FLOPs (log x): points and fits per arch, the crossover if any; `paper` adds
  the published points and lines (labelled as read off the paper's Fig. 3)."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  xs = [c for a in analysis["archs"].values() for c in a["flops"]]
  ys = [y for a in analysis["archs"].values() for y in a["loss"]]
  lo, hi = min(xs) / 2, max(xs) * 2
  cross = analysis.get("crossover", {}).get("loglinear", {}).get("C")
  if cross is not None and math.isfinite(cross) and cross < 100 * max(xs):
    hi = max(hi, cross * 2)  # draw our lines up to a nearby crossover, never further
  grid = np.geomspace(lo, hi, 200)
  for arch, a in analysis["archs"].items():
    col = COLORS.get(arch, None)
    ax.scatter(a["flops"], a["loss"], color=col, zorder=3, label=f"{LABELS.get(arch, arch)} (ours)")
    if "loglinear" in a:
      ll = a["loglinear"]
      ax.plot(grid, ll(grid), "--", color=col, lw=1,
              label=f"{LABELS.get(arch, arch)}: {ll.slope:+.3f} per decade")
    if power_law and "power_law" in a:
      pl = a["power_law"]
      inside = np.geomspace(min(a["flops"]), max(a["flops"]), 100)
      ax.plot(inside, pl(inside), "-", color=col, lw=1.5, alpha=0.6,
              label=f"{LABELS.get(arch, arch)}: {pl.E:.2f} + A·C^-{pl.alpha:.3f}")
  if cross is not None and math.isfinite(cross) and cross <= hi:
    c = analysis["crossover"]["loglinear"]
    ax.scatter([cross], [c["loss_at_C"]], marker="*", s=200, color="k", zorder=4,
               label=f"crossover (ours) {cross:.1e}")
    ys.append(c["loss_at_C"])
    lo_ci, hi_ci = c["ci"]
    if math.isfinite(lo_ci) and math.isfinite(hi_ci):
      ax.axvspan(lo_ci, hi_ci, color="k", alpha=0.06, label="crossover 95% bootstrap CI")
  if paper:
    pts = res_lib.paper_points()
    for arch in ("mmfree", "transformer"):
      p = [r for r in pts if r["arch"] == arch]
      x = np.array([r["flops"] for r in p])
      y = np.array([r["final_loss"] for r in p])
      ax.scatter(x, y, marker="s", facecolors="none", edgecolors=COLORS[arch], s=60, zorder=3,
                 label=f"{LABELS[arch]}, {res_lib.PAPER_LABEL}")
      line = fit_lib.fit_loglinear(x, y)
      g = np.geomspace(x.min(), res_lib.PAPER_CROSSOVER_C * 2, 50)
      ax.plot(g, line(g), ":", color=COLORS[arch], lw=1)
      ys += list(line(g))
    ax.scatter([res_lib.PAPER_CROSSOVER_C], [res_lib.PAPER_CROSSOVER_LOSS], marker="*", s=200,
               facecolors="none", edgecolors="k", label=f"crossover, {res_lib.PAPER_LABEL}")
  pad = 0.08 * (max(ys) - min(ys) + 1e-9)
  ax.set_ylim(min(ys) - pad, max(ys) + pad)
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs (C = 6ND, N without the input embedding)")
  key = analysis.get("loss_key", "eval_loss")
  ax.set_ylabel(f"final loss (ours: {key}; paper: train)" if paper else f"final loss ({key})")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  return fig


def plot_loss_curves(workdir: str, names: Sequence[str] | None = None, key: str = "loss"):
  """Training loss vs tokens for each run under `workdir` (from metrics.jsonl)."""
  rows = res_lib.load_results(workdir)
  names = list(names) if names else [r["name"] for r in rows]
  arch = {r["name"]: r["arch"] for r in rows}
  fig, ax = plt.subplots(figsize=(7, 4.5))
  styles = ["-", "--", "-.", ":"]
  seen: dict[str, int] = {}
  for n in names:
    m = [r for r in res_lib.read_metrics(os.path.join(workdir, n)) if key in r]
    if not m:
      continue
    a = arch.get(n, "")
    i = seen.get(a, 0)
    seen[a] = i + 1
    ax.plot([r["tokens_seen"] for r in m], [r[key] for r in m], styles[i % 4],
            color=COLORS.get(a), alpha=0.5 + 0.5 * (i + 1) / (len(names) + 1), label=n)
  ax.set_xscale("log")
  ax.set_xlabel("tokens")
  ax.set_ylabel(f"train {key}")
  ax.set_title("Loss curves")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def plot_lr_sensitivity(rows: Sequence[dict], loss_key: str = "eval_loss"):
  """Final loss vs peak LR for every group of runs that differ only in LR."""
  groups = fit_lib.lr_axis(rows)
  fig, ax = plt.subplots(figsize=(6, 4))
  for (arch, d, n_layers, tokens), rs in groups.items():
    ax.plot([r["peak_lr"] for r in rs], [r[loss_key] for r in rs], "o-", color=COLORS.get(arch),
            label=f"{LABELS.get(arch, arch)} d={d} L={n_layers}, {tokens:.3g} tokens")
  ax.set_xscale("log")
  ax.set_xlabel("peak learning rate")
  ax.set_ylabel(f"final loss ({loss_key})")
  ax.set_title("Learning-rate sensitivity")
  ax.grid(True, which="both", alpha=0.3)
  if groups:
    ax.legend(fontsize=7)
  else:
    ax.text(0.5, 0.5, "no LR axis in these results", ha="center", transform=ax.transAxes)
  fig.tight_layout()
  return fig


def plot_lr_schedules(steps: int = 1000, peaks: dict[str, float] | None = None):
  """The two recipes of SPEC §3: MatMul-free (cosine, halved at the midpoint) and
  Transformer++ (cosine to 0.1x), 1% warmup."""
  from mmfree_jax.train.optim import lr_schedule  # noqa: PLC0415
  peaks = peaks or {"mmfree": 4e-3, "transformer": 3e-4}
  warm = max(1, steps // 100)
  t = np.arange(steps)
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for arch, kind, floor in (("mmfree", "mmfree", 0.0), ("transformer", "cosine", 0.1)):
    fn = lr_schedule(peaks[arch], steps, warm, kind, floor)
    ax.plot(t, np.asarray(fn(t)) / peaks[arch], color=COLORS[arch],
            label=f"{LABELS[arch]} ({kind}; peak {peaks[arch]:g})")
  ax.set_xlabel("step")
  ax.set_ylabel("lr / peak")
  ax.set_title("Learning-rate schedules (SPEC §3)")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig
