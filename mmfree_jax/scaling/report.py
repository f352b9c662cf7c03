"""Fit and plot a sweep's results: `python -m mmfree_jax.scaling.report --workdir=DIR`.

Reads `DIR/results.csv` (written by `python -m mmfree_jax.sweep`) and writes next to it:
  scaling.{png,pdf}          loss vs FLOPs, fits per arch, crossover (`--paper`: with the
                             paper's published points, labelled "paper (read off Fig. 3)")
  loss_curves.{png,pdf}      train loss vs tokens of every run
  lr_sensitivity.{png,pdf}   loss vs peak LR (when the results hold an LR axis)
  report.md                  the points table and the fit summary; fit.json the numbers
Bad input -> one-line error, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Sequence

from mmfree_jax.scaling import fit as fit_lib
from mmfree_jax.scaling import results as res_lib


def _f(x: Any, fmt: str = ".4g") -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "–"
  if isinstance(x, float) and math.isinf(x):
    return "∞" if x > 0 else "-∞"
  return format(x, fmt)


def _ci(ci: tuple[float, float], fmt: str = ".3g") -> str:
  return f"[{_f(ci[0], fmt)}, {_f(ci[1], fmt)}]"


def to_json(analysis: dict[str, Any]) -> dict[str, Any]:
  """The numbers of `fit.analyze` without the bootstrap samples (JSON-ready)."""
  out = {"loss_key": analysis["loss_key"], "n_boot": analysis["n_boot"],
         "c_range": list(analysis["c_range"]), "archs": {}, "crossover": {}}
  for arch, a in analysis["archs"].items():
    d: dict[str, Any] = {"n": a["n"], "names": a["names"], "flops": a["flops"], "loss": a["loss"]}
    if "loglinear" in a:
      ll = a["loglinear"]
      d["loglinear"] = {"a": ll.a, "slope_per_decade": ll.slope,
                        "slope_ci": list(a["loglinear_ci"]["slope"])}
    if "power_law" in a:
      pl = a["power_law"]
      d["power_law"] = {"E": pl.E, "A": pl.A, "alpha": pl.alpha,
                        **{f"{k}_ci": list(v) for k, v in a["power_law_ci"].items()}}
    if "nd" in a:
      nd = a["nd"]
      d["nd"] = {"E": nd.E, "A": nd.A, "alpha": nd.alpha, "B": nd.B, "beta": nd.beta}
    out["archs"][arch] = d
  for kind, c in analysis.get("crossover", {}).items():
    out["crossover"][kind] = c if not isinstance(c, dict) else {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in c.items()}
  return _clean(out)


def _clean(x: Any) -> Any:
  """Strict JSON: non-finite floats become the strings "inf" / "-inf" / "nan"."""
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  return x


def markdown(analysis: dict[str, Any], rows: Sequence[dict], title: str) -> str:
  """The report: points table, fits with intervals, crossover, the paper's numbers."""
  L = [f"# Scaling-law report: {title}", ""]
  L += ["| point | arch | d | L | non-emb params | tokens | FLOPs | tokens/param | epochs | "
        "train loss | held-out loss |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    L.append(f"| {r['name']} | {r['arch']} | {r['d_model']} | {r['n_layers']} | "
             f"{r['non_embedding_params']:,} | {_f(r['tokens'], '.3g')} | "
             f"{_f(r['flops'], '.3g')} | "
             f"{_f(r['tokens_per_param'], '.3g')} | {_f(r.get('epochs'), '.3g')} | "
             f"{_f(r.get('final_loss'))} | {_f(r.get('eval_loss'))} |")
  n_boot = analysis["n_boot"]
  L += ["", f"## Fits ({analysis['loss_key']} vs C; 95% percentile bootstrap over points, "
        f"{n_boot} resamples)", "",
        "| arch | points | slope per decade [CI] | power law E [CI] | alpha [CI] | A |",
        "|---|---|---|---|---|---|"]
  notes = []
  for arch, a in analysis["archs"].items():
    ll, pl = a.get("loglinear"), a.get("power_law")
    slope = f"{ll.slope:+.4f} {_ci(a['loglinear_ci']['slope'], '+.3f')}" if ll else "–"
    e = f"{pl.E:.4f} {_ci(a['power_law_ci']['E'])}" if pl else "–"
    al = f"{pl.alpha:.4f} {_ci(a['power_law_ci']['alpha'])}" if pl else "–"
    L.append(f"| {arch} | {a['n']} | {slope} | {e} | {al} | {_f(pl.A, '.3g') if pl else '–'} |")
    if a.get("power_law_note"):
      notes.append(f"{arch}: {a['power_law_note']}")
    if "nd" in a:
      nd = a["nd"]
      notes.append(f"{arch}: L(N, D) = {nd.E:.3f} + {nd.A:.3g}/N^{nd.alpha:.3f} + "
                   f"{nd.B:.3g}/D^{nd.beta:.3f}")
    elif a.get("nd_note"):
      notes.append(f"{arch}: {a['nd_note']}")
  L += [""] + [f"- {n}" for n in notes]
  L += ["", "## Crossover (MatMul-free vs Transformer++)", ""]
  cross = analysis.get("crossover", {})
  if "status" in cross:
    L.append(f"- {cross['status']}")
  for kind in ("loglinear", "power_law"):
    c = cross.get(kind)
    if c:
      line = f"- {kind}: {c['status']}"
      if math.isfinite(c["frac_crossing"]):
        line += (f"; bootstrap median {_f(c['median'], '.3g')}, 95% CI {_ci(c['ci'])}, "
                 f"{100 * c['frac_crossing']:.0f}% of resamples cross in "
                 f"[{analysis['c_range'][0]:.2g}, {analysis['c_range'][1]:.2g}]")
      L.append(line)
  pts = res_lib.paper_points()
  slopes = {}
  for arch in ("mmfree", "transformer"):
    p = [r for r in pts if r["arch"] == arch]
    slopes[arch] = fit_lib.fit_loglinear([r["flops"] for r in p], [r["final_loss"] for r in p])
  pc = fit_lib.loglinear_crossover(slopes["mmfree"], slopes["transformer"])
  L += ["", "## The paper (SPEC §4; values read off its Fig. 3)", "",
        f"- fitted lines: MatMul-free {res_lib.PAPER_SLOPE['mmfree']:+.2f}, Transformer++ "
        f"{res_lib.PAPER_SLOPE['transformer']:+.2f} loss per decade; crossover near 1e23 FLOPs "
        f"(star near {res_lib.PAPER_CROSSOVER_C:.0e}, loss ~{res_lib.PAPER_CROSSOVER_LOSS}).",
        f"- lines through the published 370M and 2.7B losses (C = 6ND): MatMul-free "
        f"{slopes['mmfree'].slope:+.3f}, Transformer++ {slopes['transformer'].slope:+.3f} per "
        f"decade, crossing at {_f(pc, '.2g')} FLOPs. 1.3B points: not given in SPEC, omitted.",
        "- ours: held-out loss on our corpus, not SlimPajama train loss; only slopes and the "
        "sign of the gap compare, not the loss values.", ""]
  warn = [r["name"] for r in rows if (r.get("epochs") or 0) > 1]
  if warn:
    L += [f"- note: more than one epoch for {', '.join(warn)} (repeated data)", ""]
  return "\n".join(L)


def run(workdir: str, paper: bool = False, n_boot: int = 200, loss_key: str = "eval_loss",
        out: str | None = None, seed: int = 0) -> dict[str, Any]:
  """Writes the figures, report.md and fit.json; returns {"analysis", "files"}."""
  from mmfree_jax.scaling import plots  # noqa: PLC0415 (matplotlib only when plotting)
  rows = res_lib.load_results(workdir)
  if not rows:
    raise res_lib.ResultsError(f"{workdir}/results.csv has no finished points yet")
  out = out or workdir
  os.makedirs(out, exist_ok=True)
  analysis = fit_lib.analyze(rows, n_boot=n_boot, seed=seed, loss_key=loss_key)
  files = plots.save(plots.plot_scaling(analysis, paper=paper), os.path.join(out, "scaling"))
  files += plots.save(plots.plot_loss_curves(workdir), os.path.join(out, "loss_curves"))
  if fit_lib.lr_axis(rows):
    files += plots.save(plots.plot_lr_sensitivity(rows, loss_key),
                        os.path.join(out, "lr_sensitivity"))
  plots.plt.close("all")
  md = os.path.join(out, "report.md")
  with open(md, "w") as f:
    f.write(markdown(analysis, rows, os.path.abspath(workdir)))
  js = os.path.join(out, "fit.json")
  with open(js, "w") as f:
    json.dump(to_json(analysis), f, indent=2, default=float)
  return {"analysis": analysis, "files": files + [md, js]}


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m mmfree_jax.scaling.report", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="sweep directory holding results.csv")
  ap.add_argument("--out", default=None, help="output directory (default: --workdir)")
  ap.add_argument("--paper", action="store_true", help="overlay the paper's published points")
  ap.add_argument("--n_boot", type=int, default=200, help="bootstrap resamples")
  ap.add_argument("--loss", default="eval_loss", choices=("eval_loss", "final_loss"))
  args = ap.parse_args(argv)
  if args.n_boot < 1:
    print("error: --n_boot must be >= 1", file=sys.stderr)
    return 2
  try:
    res = run(args.workdir, args.paper, args.n_boot, args.loss, args.out)
  except (res_lib.ResultsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for p in res["files"]:
    print(p)
  return 0


if __name__ == "__main__":
  sys.exit(main())
