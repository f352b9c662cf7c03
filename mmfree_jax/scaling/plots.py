"""Figures of a sweep (matplotlib; no backend choice here, so notebooks show them inline):
Fig. 3 analogue, loss vs tokens per model size with the L(N, D) fits, the loss gap between
the arches, loss curves, LR sensitivity, LR schedules. Each function returns the Figure;
`save(fig, stem)` writes it reproducibly (no timestamps in the files).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np

from mmfree_jax.scaling import fit as fit_lib
from mmfree_jax.scaling import results as res_lib

COLORS = {"mmfree": "tab:red", "transformer": "tab:blue"}
LABELS = {"mmfree": "MatMul-free", "transformer": "Transformer++"}
METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None}}
FAINT = 0.3  # alpha of a fit the report calls unconstrained


def save(fig, stem: str, formats: Sequence[str] = ("png",)) -> list[str]:
  """Writes `stem.<fmt>` for each format, without timestamps; returns the paths."""
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  paths = [f"{stem}.{fmt}" for fmt in formats]
  for p, fmt in zip(paths, formats):
    fig.savefig(p, dpi=150, bbox_inches="tight", metadata=METADATA.get(fmt))
  return paths


def _label(arch: str) -> str:
  return LABELS.get(arch, arch)


def _style(f: fit_lib.Fitted, label: str) -> dict[str, Any]:
  """Line style of a fit: faint and labelled when the report calls it unconstrained."""
  if f.unconstrained:
    return {"alpha": FAINT, "label": f"{label} (unconstrained)"}
  return {"alpha": 0.9, "label": label}


def _note(ax, text: str):
  ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9,
          transform=ax.transAxes)


def _finish(ax, xlabel: str, ylabel: str, title: str, legend: bool = True):
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(True, which="major", alpha=0.3)
  if legend and ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7, loc="best")


def plot_scaling(analysis: dict[str, Any], paper: bool = False,
                 title: str = "Final loss vs training compute"):
  """Loss vs FLOPs (log x): points, L(C) line and power law per arch, the line crossover if
  near. `paper`: the paper's points and lines in a panel of their own, and a panel of the
  slopes per decade (ours with 95% intervals) side by side."""
  n_ax = 3 if paper else 1
  fig, axs = plt.subplots(1, n_ax, figsize=(6.5 * n_ax if paper else 7, 4.5), squeeze=False)
  ax = axs[0, 0]
  archs = analysis["archs"]
  if not archs:
    _note(ax, "no finished points")
  xs = [c for a in archs.values() for c in a["flops"]] or [1.0]
  lo, hi = min(xs) / 1.5, max(xs) * 1.5
  cross = analysis["crossover"].get("loglinear", {})
  c_x = cross.get("C")
  if c_x is not None and c_x < 100 * max(xs):
    hi = max(hi, c_x * 1.5)  # draw the lines up to a nearby crossover, never further
  grid = np.geomspace(lo, hi, 200)
  for arch, a in archs.items():
    col, name = COLORS.get(arch), _label(arch)
    ax.scatter(a["flops"], a["loss"], s=18, color=col, zorder=3, label=f"{name} ({a['n']} runs)")
    f = a["fits"].get("loglinear")
    if f:
      lo_s, hi_s = f.ci["slope_per_decade"]
      ax.plot(grid, f.law(grid), "--", color=col, lw=1.2, **_style(
          f, f"{name} line: {f.law.slope:+.3f} [{lo_s:+.3f}, {hi_s:+.3f}] per decade"))
    f = a["fits"].get("power_law")
    if f:
      inside = np.geomspace(min(a["flops"]), max(a["flops"]), 100)
      ax.plot(inside, f.law(inside), "-", color=col, lw=1.5, **_style(
          f, f"{name} power law: {f.law.E:.2f} + A·C^-{f.law.alpha:.3f}"))
  if c_x is not None and c_x <= hi:
    ax.scatter([c_x], [cross["loss_at_C"]], marker="*", s=200, color="k", zorder=4,
               label=f"lines cross at {c_x:.2g} FLOPs")
    ci_lo, ci_hi = cross["ci"]
    if math.isfinite(ci_lo):
      ax.axvspan(ci_lo, min(ci_hi, hi), color="k", alpha=0.06,
                 label=f"crossover 95% CI [{ci_lo:.2g}, {ci_hi:.2g}]")
  ax.set_xscale("log")
  key = analysis.get("loss_key", "eval_loss")
  _finish(ax, "training FLOPs C (6ND, N without the input embedding)",
          f"final loss ({key})", title)
  if paper:
    _paper_panel(axs[0, 1])
    _slopes_panel(axs[0, 2], analysis)
  fig.tight_layout()
  return fig


def _paper_panel(ax):
  """The paper's published final losses and the lines through them (SPEC §4)."""
  pts = res_lib.paper_points()
  g = np.geomspace(min(p["flops"] for p in pts) / 2, res_lib.PAPER_CROSSOVER_C * 3, 50)
  for arch in ("mmfree", "transformer"):
    p = [r for r in pts if r["arch"] == arch]
    x, y = [r["flops"] for r in p], [r["final_loss"] for r in p]
    ax.scatter(x, y, marker="s", color=COLORS[arch], s=40, zorder=3,
               label=f"{_label(arch)}: " + ", ".join(r["size"] for r in p))
    line = fit_lib.fit_loglinear(x, y)
    ax.plot(g, line(g), ":", color=COLORS[arch], lw=1.2,
            label=f"{_label(arch)} line through them: {line.slope:+.3f} per decade")
  ax.scatter([res_lib.PAPER_CROSSOVER_C], [res_lib.PAPER_CROSSOVER_LOSS], marker="*", s=200,
             facecolors="none", edgecolors="k",
             label=f"paper's crossover star (~{res_lib.PAPER_CROSSOVER_C:.0e})")
  ax.set_xscale("log")
  _finish(ax, "training FLOPs C (6ND)", "final train loss (SlimPajama)",
          "The paper's published points (SPEC §4)")


def _slopes_panel(ax, analysis: dict[str, Any]):
  """Loss change per decade of compute: ours with 95% intervals, the paper's."""
  paper_pts = res_lib.paper_points()
  for i, arch in enumerate(("mmfree", "transformer")):
    col = COLORS[arch]
    f = analysis["archs"].get(arch, {}).get("fits", {}).get("loglinear")
    if f:
      lo, hi = f.ci["slope_per_decade"]
      s = f.law.slope
      yerr = [[s - lo], [hi - s]] if math.isfinite(lo) else None
      ax.errorbar([i - 0.15], [s], yerr=yerr, fmt="o", color=col, capsize=4,
                  alpha=FAINT if f.unconstrained else 1.0,
                  label=f"ours, {_label(arch)} (95% CI)")
    ax.scatter([i + 0.05], [res_lib.PAPER_SLOPE[arch]], marker="s", color=col,
               label=f"paper's line, {_label(arch)} (read off Fig. 3)")
    p = [r for r in paper_pts if r["arch"] == arch]
    line = fit_lib.fit_loglinear([r["flops"] for r in p], [r["final_loss"] for r in p])
    ax.scatter([i + 0.2], [line.slope], marker="D", facecolors="none", edgecolors=col,
               label=f"through the paper's points, {_label(arch)}")
  ax.axhline(0, color="k", lw=0.5)
  ax.set_xticks([0, 1], [_label("mmfree"), _label("transformer")])
  ax.set_xlim(-0.6, 1.6)
  _finish(ax, "architecture", "loss change per decade of compute", "Slopes per decade")


def _sizes(a: dict[str, Any]) -> list[float]:
  return sorted(set(a["N"]))


def plot_nd(analysis: dict[str, Any]):
  """Loss vs training tokens D, one line per model size N, with the L(N, D) fit per arch."""
  archs = list(analysis["archs"].items())
  fig, axs = plt.subplots(1, max(1, len(archs)), figsize=(6.5 * max(1, len(archs)), 4.5),
                          squeeze=False, sharey=True)
  if not archs:
    _note(axs[0, 0], "no finished points")
  for ax, (arch, a) in zip(axs[0], archs):
    f = a["fits"].get("nd")
    sizes = _sizes(a)
    cmap = plt.get_cmap("viridis")
    for k, n in enumerate(sizes):
      col = cmap(k / max(1, len(sizes) - 1) * 0.9)
      d = [dd for nn, dd in zip(a["N"], a["D"]) if nn == n]
      y = [yy for nn, yy in zip(a["N"], a["loss"]) if nn == n]
      ax.scatter(d, y, color=col, s=20, zorder=3, label=f"N = {n:.3g}")
      if f:
        g = np.geomspace(min(a["D"]) / 1.3, max(a["D"]) * 1.3, 100)
        ax.plot(g, f.law(n, g), "-", color=col, lw=1.2,
                alpha=FAINT if f.unconstrained else 0.9)
    if f:
      law = f.law
      head = (f"L = {law.E:.2f} + A/N^{law.alpha:.3f} + B/D^{law.beta:.3f}"
              + (" (unconstrained)" if f.unconstrained else ""))
    else:
      head = f"L(N, D) not fitted: {a['skipped'].get('nd', '')}"
    ax.set_xscale("log")
    _finish(ax, "training tokens D", f"final loss ({analysis['loss_key']})",
            f"{_label(arch)}: {head}")
  fig.tight_layout()
  return fig


def plot_gap(analysis: dict[str, Any], archs: tuple[str, str] = ("mmfree", "transformer")):
  """L1(N, D) - L2(N, D) from the L(N, D) fits with 95% bootstrap bands: vs D at three fixed
  N, and vs N at three fixed D (the data's range and geometric middle)."""
  g = analysis["gap"]
  fig, axs = plt.subplots(1, 2, figsize=(12, 4.2), squeeze=False)
  ylabel = f"loss gap, {_label(archs[0])} - {_label(archs[1])}"
  if "skipped" in g:
    for ax in axs[0]:
      _note(ax, f"loss gap not computed: {g['skipped']}")
      _finish(ax, "training tokens D" if ax is axs[0, 0] else "non-embedding parameters N",
              ylabel, "Loss gap from the L(N, D) fits")
    fig.tight_layout()
    return fig
  l1, l2 = (analysis["archs"][a]["fits"]["nd"].law for a in archs)
  cmap = plt.get_cmap("plasma")
  for ax, fixed, along, name, other in ((axs[0, 0], g["N"], g["D"], "N", "D"),
                                        (axs[0, 1], g["D"], g["N"], "D", "N")):
    x = np.geomspace(along[0], along[-1], 60)
    for k, v in enumerate(fixed):
      col = cmap(k / max(1, len(fixed) - 1) * 0.8)
      n, d = (np.full_like(x, v), x) if name == "N" else (x, np.full_like(x, v))
      point, lo, hi = fit_lib.nd_gap(l1, l2, g["draws"], n, d)
      ax.plot(x, point, color=col, label=f"{name} = {v:.3g}")
      ax.fill_between(x, lo, hi, color=col, alpha=0.15, lw=0)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xscale("log")
    what = "training tokens D" if other == "D" else "non-embedding parameters N"
    _finish(ax, what, ylabel, f"Gap vs {other} at fixed {name} (bands: 95% bootstrap)")
  fig.tight_layout()
  return fig


def plot_loss_curves(workdir: str, names: Sequence[str] | None = None, key: str = "loss"):
  """Train loss vs tokens, one panel per arch: colour = model size, line style = token
  budget (tokens per parameter). Default: the runs of the scaling grid (no LR axis)."""
  rows = res_lib.load_results(workdir)
  if names is None:
    names = [r["name"] for rs in fit_lib.scaling_points(rows).values() for r in rs]
  by_name = {r["name"]: r for r in rows}
  rs = [by_name[n] for n in names if n in by_name]
  archs = sorted({r["arch"] for r in rs})
  fig, axs = plt.subplots(1, max(1, len(archs)), figsize=(6.5 * max(1, len(archs)), 4.5),
                          squeeze=False, sharey=True)
  styles = ["-", "--", ":", "-."]
  for ax, arch in zip(axs[0], archs):
    mine = [r for r in rs if r["arch"] == arch]
    sizes = sorted({r["non_embedding_params"] for r in mine})
    budgets = sorted({f"{r['tokens_per_param']:.2g}" for r in mine}, key=float)
    if len(budgets) > 4 or len(budgets) == len(mine):  # not a grid of shared token budgets
      budgets = []
    cmap = plt.get_cmap("viridis")
    drawn = set()
    for r in mine:
      point = os.path.join(workdir, r["name"])
      if not os.path.isfile(os.path.join(point, "metrics.jsonl")):
        continue
      m = [x for x in res_lib.read_metrics(point) if key in x]
      k = sizes.index(r["non_embedding_params"])
      b = f"{r['tokens_per_param']:.2g}"
      ax.plot([x["tokens_seen"] for x in m], [x[key] for x in m],
              styles[budgets.index(b)] if budgets else "-",
              color=cmap(k / max(1, len(sizes) - 1) * 0.9), lw=1)
      drawn.add((k, b))
    for k, n in enumerate(sizes):  # legend: sizes by colour, budgets by line style
      if any(kk == k for kk, _ in drawn):
        ax.plot([], [], color=cmap(k / max(1, len(sizes) - 1) * 0.9), label=f"N = {n:.3g}")
    for i, b in enumerate(budgets):
      if any(bb == b for _, bb in drawn):
        ax.plot([], [], styles[i], color="gray", label=f"{b} tokens/param")
    if not drawn:
      _note(ax, f"no metrics.jsonl under {workdir}")
    ax.set_xscale("log")
    _finish(ax, "tokens seen", f"train {key}", f"{_label(arch)}: loss curves")
  if not archs:
    _note(axs[0, 0], "no runs")
  fig.tight_layout()
  return fig


def plot_lr_sensitivity(rows: Sequence[dict], loss_key: str = "eval_loss"):
  """Final loss vs peak LR for every group of runs that differ only in LR; the LR the
  scaling grid uses (each arch's most common one) is starred."""
  groups = fit_lib.lr_axis(rows)
  chosen = {a: float(rs[0]["peak_lr"]) for a, rs in fit_lib.scaling_points(rows, loss_key).items()}
  fig, ax = plt.subplots(figsize=(7, 4.5))
  lrs = sorted({float(r["peak_lr"]) for rs in groups.values() for r in rs})
  seen: dict[str, int] = {}
  for (arch, d, n_layers, tokens), rs in groups.items():
    rs = [r for r in rs if r.get(loss_key) is not None]
    i = seen[arch] = seen.get(arch, -1) + 1
    col = COLORS.get(arch)
    x = [float(r["peak_lr"]) for r in rs]
    ax.plot(x, [r[loss_key] for r in rs], "o" + ["-", "--", ":"][i % 3], color=col,
            label=f"{_label(arch)} d={d} L={n_layers}, {tokens:.3g} tokens")
    for r in rs:
      if arch in chosen and float(r["peak_lr"]) == chosen[arch]:
        ax.scatter([r["peak_lr"]], [r[loss_key]], marker="*", s=220, color=col,
                   edgecolors="k", zorder=4, label=f"{_label(arch)}: grid LR {chosen[arch]:.2g}")
  ax.set_xscale("log")
  if lrs:
    ax.set_xticks(lrs, [f"{v:.2g}" for v in lrs], rotation=30)
    ax.minorticks_off()
  else:
    _note(ax, "no LR axis in these results")
  _finish(ax, "peak learning rate", f"final loss ({loss_key})", "Learning-rate sensitivity")
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
  _finish(ax, "step", "lr / peak", "Learning-rate schedules (SPEC §3)")
  fig.tight_layout()
  return fig
