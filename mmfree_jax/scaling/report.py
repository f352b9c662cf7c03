"""Fit and plot a sweep's results: `python -m mmfree_jax.scaling.report --workdir=DIR [--paper]`.

Reads `DIR/results.csv` (written by `python -m mmfree_jax.sweep`; per-point `metrics.jsonl`
for the loss curves) and writes next to it (or into `--out`):
  report.md            findings, what the data can support, every fit with its 95% bootstrap
                       interval, the loss gap, compute-optimal N(C), crossovers, the points
  fit.json             the numbers of report.md
  scaling.png          loss vs FLOPs per arch with the L(C) fits (Fig. 3 analogue; `--paper`:
                       the paper's points in their own panel and the slopes side by side)
  nd.png               loss vs tokens, one line per model size, with the L(N, D) fits
  gap.png              the L(N, D) loss gap between the arches vs D and vs N
  loss_curves.png      train loss vs tokens of the grid's runs
  lr_sensitivity.png   loss vs peak LR, the grid's LR marked (when the results hold an LR axis)
Everything is determined by the input files (fixed bootstrap seed): a rerun reproduces the
outputs byte for byte. Figures are PNG; PDFs too when `--out` is not a results directory.
`--readme_table` prints the findings table of an existing `fit.json` (for results/README.md).
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

ARCHS = ("mmfree", "transformer")
NAMES = {"mmfree": "MatMul-free", "transformer": "Transformer++",
         "loglinear": "L(C) straight line in log C", "power_law": "L(C) power law",
         "nd": "compute-optimal L(N, D)"}


def _f(x: Any, fmt: str = ".4g") -> str:
  """A number for the report ("inf" / "nan" as fit.json writes them: ∞ / –)."""
  if x is None:
    return "–"
  x = float(x)
  if math.isnan(x):
    return "–"
  if math.isinf(x):
    return "∞" if x > 0 else "-∞"
  return format(x, fmt).replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _ci(ci: Sequence, fmt: str = ".3g") -> str:
  return f"[{_f(ci[0], fmt)}, {_f(ci[1], fmt)}]"


def _val(d: dict, key: str, fmt: str) -> str:
  """`value [lo, hi]` of a fit's parameter, † when the fit is unconstrained."""
  mark = " †" if d.get("unconstrained") else ""
  return f"{_f(d[key], fmt)} {_ci(d[key + '_ci'], fmt)}{mark}"


# --- fit.json -----------------------------------------------------------------------

def to_json(analysis: dict[str, Any]) -> dict[str, Any]:
  """The numbers of `fit.analyze` (no bootstrap samples), the paper's, JSON-ready."""
  out: dict[str, Any] = {"loss_key": analysis["loss_key"], "n_boot": analysis["n_boot"],
                         "seed": analysis["seed"], "archs": {}}
  for arch, a in analysis["archs"].items():
    d: dict[str, Any] = {k: a[k] for k in ("n", "names", "flops", "N", "D", "loss")}
    for kind, f in a["fits"].items():
      d[kind] = {"unconstrained": f.unconstrained}
      for k, g in fit_lib.PARAMS[kind].items():
        d[kind][k], d[kind][f"{k}_ci"] = g(f.law), list(f.ci[k])
    d["skipped"] = a["skipped"]
    if "optimal" in a:
      d["optimal"] = a["optimal"]
    out["archs"][arch] = d
  out["gap"] = {k: v for k, v in analysis["gap"].items() if k != "draws"}
  out["crossover"] = analysis["crossover"]
  out["paper"] = paper_numbers()
  return _clean(out)


def paper_numbers() -> dict[str, Any]:
  """SPEC §4: slopes and crossover read off Fig. 3, and lines through the published points."""
  pts = res_lib.paper_points()
  lines = {a: fit_lib.fit_loglinear([p["flops"] for p in pts if p["arch"] == a],
                                    [p["final_loss"] for p in pts if p["arch"] == a])
           for a in ARCHS}
  return {"slope": dict(res_lib.PAPER_SLOPE), "crossover_C": res_lib.PAPER_CROSSOVER_C,
          "crossover_loss": res_lib.PAPER_CROSSOVER_LOSS,
          "points_slope": {a: lines[a].slope for a in ARCHS},
          "points_crossover_C": fit_lib.loglinear_crossover(*(lines[a] for a in ARCHS))}


def _clean(x: Any) -> Any:
  """Strict, stable JSON: floats to 6 significant digits, non-finite ones as strings."""
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if isinstance(x, float) or type(x).__module__ == "numpy":
    x = float(x)
    return float(f"{x:.6g}") if math.isfinite(x) else str(x)
  return x


# --- markdown -----------------------------------------------------------------------

def findings_table(js: dict[str, Any]) -> str:
  """The findings in two markdown tables (ours beside the paper's and others' statements),
  from a fit.json dict: what results/README.md shows."""
  arch = {a: js["archs"].get(a, {}) for a in ARCHS}
  paper = js["paper"]

  def cell(a: str, kind: str, key: str, fmt: str) -> str:
    d = arch[a].get(kind)
    if d is None:
      return "skipped" if kind in arch[a].get("skipped", {}) else "–"
    return _val(d, key, fmt)

  rows = [("L(C) slope, loss per decade of C", "loglinear", "slope_per_decade", "+.3f",
           [f"{paper['slope'][a]:+.2f}" for a in ARCHS], ""),
          ("L(N, D) alpha (exponent of N)", "nd", "alpha", ".3f", ["not fitted"] * 2, ""),
          ("L(N, D) beta (exponent of D)", "nd", "beta", ".3f", ["not fitted"] * 2, ""),
          ("beta - alpha", "nd", "beta_minus_alpha", "+.3f", ["not fitted"] * 2,
           "Spectra 1.1 (ternary transformers): beta ≫ alpha; Kumar et al. (post-training "
           "quantization): the opposite"),
          ("L(N, D) E (irreducible loss)", "nd", "E", ".3f", ["not fitted"] * 2, ""),
          ("compute-optimal N ∝ C^a, a = beta/(alpha+beta)", "nd", "n_opt_exponent", ".2f",
           ["not fitted"] * 2, "")]
  L = ["| quantity [95% CI] | ours: MatMul-free | ours: Transformer++ | paper: MatMul-free | "
       "paper: Transformer++ | other work |", "|---|---|---|---|---|---|"]
  for name, kind, key, fmt, theirs, other in rows:
    L.append(f"| {name} | {cell('mmfree', kind, key, fmt)} | "
             f"{cell('transformer', kind, key, fmt)} | {theirs[0]} | {theirs[1]} | {other} |")
  L += ["", "| MatMul-free meets Transformer++ | ours: C in FLOPs [95% CI] | resamples crossing | "
        "paper |", "|---|---|---|---|"]
  for kind in fit_lib.KINDS:
    c = js["crossover"].get(kind, {})
    theirs = (f"~1e23 (star near {_f(paper['crossover_C'], '.0e')}); lines through its 370M "
              f"and 2.7B points: {_f(paper['points_crossover_C'], '.2g')}"
              if kind == "loglinear" else "–")
    if "skipped" in c or not c:
      L.append(f"| {NAMES[kind]} | skipped | – | {theirs} |")
      continue
    mark = " †" if c["unconstrained"] else ""
    where = "none in range" if c["C"] is None else _f(c["C"], ".2g")
    ci = "(no interval)" if math.isnan(float(c["frac_crossing"])) else _ci(c["ci"], ".2g")
    L.append(f"| {NAMES[kind]} | {where} {ci}{mark} | {_pct(c['frac_crossing'])} | {theirs} |")
  L += ["", "† from a fit the report calls unconstrained (see report.md). Ours: held-out loss "
        "of small models on our corpus; the paper's: SlimPajama train loss at 370M-2.7B."]
  return "\n".join(L)


def _pct(x: Any) -> str:
  x = float(x)
  return "–" if math.isnan(x) else f"{100 * x:.0f}%"


def _support(js: dict[str, Any], rows: Sequence[dict], corpus: str | None) -> list[str]:
  """What the data can and cannot support, from the numbers."""
  L = []
  for arch, a in js["archs"].items():
    tpp = sorted({round(d / n, 1) for n, d in zip(a["N"], a["D"])})
    tpp_s = ", ".join(f"{t:g}" for t in tpp) if len(tpp) <= 4 else f"{tpp[0]:g}..{tpp[-1]:g}"
    L.append(f"- {NAMES.get(arch, arch)}: {a['n']} points in the fits, N (non-embedding "
             f"params) {min(a['N']):.3g}..{max(a['N']):.3g} ({max(a['N']) / min(a['N']):.0f}x), "
             f"D {min(a['D']):.3g}..{max(a['D']):.3g} tokens, {tpp_s} tokens per parameter, "
             f"C {min(a['flops']):.3g}..{max(a['flops']):.3g} FLOPs.")
  epochs = [float(r["epochs"]) for r in rows if r.get("epochs") is not None]
  unigram = [float(r["unigram_xent_validation"]) for r in rows
             if r.get("unigram_xent_validation") is not None]
  corpus_tokens = [float(r["tokens"]) / float(r["epochs"]) for r in rows if r.get("epochs")]
  L.append(f"- Corpus: {corpus or 'not recorded'}"
           + (f", ~{corpus_tokens[0]:.3g} training tokens" if corpus_tokens else "")
           + (f"; at most {max(epochs):.2g} epochs" if epochs else "") + ".")
  losses = [y for a in js["archs"].values() for y in a["loss"]]
  if unigram and losses and min(losses) > min(unigram):
    L.append(f"- Every model is still above the unigram baseline ({min(unigram):.2f} nats): "
             "these points measure the start of training, not scaling.")
  c_max = max((max(a["flops"]) for a in js["archs"].values()), default=math.nan)
  L += [f"- The paper's models (370M-2.7B, 15-100B tokens, ~1e21-2e22 FLOPs) and its ~1e23 "
        f"crossover lie {math.log10(1e23 / c_max):.0f} decades of compute beyond our largest "
        f"point ({c_max:.2g} FLOPs): a crossover we report there is an extrapolation of the "
        "fitted form, and its interval covers the noise of our points, not the choice of form.",
        "- One training run (one seed) per point: run-to-run noise shows only as scatter about "
        "the fits. Each arch trains at one peak LR for every size; the LR axis (when present) "
        "checks it at one size only.",
        "- Our loss is held-out loss on our corpus, the paper's SlimPajama train loss: slopes, "
        "exponents and the sign of the gap compare, loss values do not."]
  return L


def markdown(js: dict[str, Any], rows: Sequence[dict], title: str,
             corpus: str | None = None) -> str:
  """The report, from fit.json's numbers and the results rows."""
  L = [f"# Scaling-law report: {title}", "",
       f"Loss: `{js['loss_key']}`. Intervals: 95% percentile bootstrap over points, "
       f"{js['n_boot']} resamples, seed {js['seed']} (paired between the arches when their grids "
       "have the same number of points). Fits use each arch's points at its grid LR (the LR axis "
       "is left out). † marks a fit that does not constrain its parameters.", "",
       "## Findings", "", findings_table(js), "",
       "## What these data can and cannot support", "", *_support(js, rows, corpus), ""]
  for section in (_lc_md(js), _nd_md(js), _optimal_md(js), _gap_md(js), _crossover_md(js),
                  _points_md(js, rows)):
    L += section + [""]
  return "\n".join(L)


def _lc_md(js: dict[str, Any]) -> list[str]:
  L = ["## L(C): loss vs compute (Fig. 3 analogue)", "",
       "C is the `flops` column (6·N·D with N all parameters but the input embedding, plus "
       "attention for Transformer++). The fits pool every token budget of the grid.", "",
       "| arch | points | slope per decade [CI] | power law E [CI] | alpha [CI] | A |",
       "|---|---|---|---|---|---|"]
  notes = []
  for arch, a in js["archs"].items():
    ll, pl = a.get("loglinear"), a.get("power_law")
    slope = _val(ll, "slope_per_decade", "+.4f") if ll else "–"
    law = (f"{_val(pl, 'E', '.4f')} | {_val(pl, 'alpha', '.4f')} | {_f(pl['A'], '.3g')}"
           if pl else "– | – | –")
    L.append(f"| {arch} | {a['n']} | {slope} | {law} |")
    notes += _notes(arch, a, ("loglinear", "power_law"))
  return L + ([""] + notes if notes else [])


def _nd_md(js: dict[str, Any]) -> list[str]:
  L = ["## L(N, D) = E + A/N^alpha + B/D^beta", "",
       "N: non-embedding parameters (`non_embedding_params`); D: training tokens.", "",
       "| arch | points | E [CI] | alpha [CI] | beta [CI] | beta - alpha [CI] | A | B |",
       "|---|---|---|---|---|---|---|---|"]
  notes = []
  for arch, a in js["archs"].items():
    nd = a.get("nd")
    law = (f"{_val(nd, 'E', '.4f')} | {_val(nd, 'alpha', '.4f')} | {_val(nd, 'beta', '.4f')} | "
           f"{_val(nd, 'beta_minus_alpha', '+.4f')} | {_f(nd['A'], '.3g')} | {_f(nd['B'], '.3g')}"
           if nd else "skipped | – | – | – | – | –")
    L.append(f"| {arch} | {a['n']} | {law} |")
    notes += _notes(arch, a, ("nd",))
  return L + ([""] + notes if notes else [])


def _points_md(js: dict[str, Any], rows: Sequence[dict]) -> list[str]:
  fitted = {n for a in js["archs"].values() for n in a["names"]}
  L = ["## Points", "", "In the fits: ✓ (the others: the LR axis).", "",
       "| point | arch | d | L | non-emb params | tokens | FLOPs | tokens/param | epochs | "
       "peak LR | train loss | held-out loss | fit |", "|---" * 13 + "|"]
  for r in rows:
    L.append(f"| {r['name']} | {r['arch']} | {r['d_model']} | {r['n_layers']} | "
             f"{r['non_embedding_params']:,} | {_f(r['tokens'], '.3g')} | "
             f"{_f(r['flops'], '.3g')} | {_f(r['tokens_per_param'], '.3g')} | "
             f"{_f(r.get('epochs'), '.3g')} | {_f(r['peak_lr'], '.3g')} | "
             f"{_f(r.get('final_loss'))} | {_f(r.get('eval_loss'))} | "
             f"{'✓' if r['name'] in fitted else ''} |")
  return L


def _notes(arch: str, a: dict, kinds: Sequence[str]) -> list[str]:
  out = []
  for kind in kinds:
    if kind in a["skipped"]:
      out.append(f"- {arch}: {NAMES[kind] if kind != 'nd' else 'L(N, D)'} skipped: "
                 f"{a['skipped'][kind]}")
    elif a[kind]["unconstrained"]:
      out.append(f"- {arch}: {kind} unconstrained: {a[kind]['unconstrained']}")
  return out


def _optimal_md(js: dict[str, Any]) -> list[str]:
  L = ["## Compute-optimal allocation (from L(N, D), C = 6·N·D)", "",
       "N_opt ∝ C^a with a = beta/(alpha+beta), D_opt ∝ C^(1-a). Here C = 6·N·D with N the "
       "non-embedding parameters (not the `flops` column); the reference C is the largest of the "
       "grid.", "", "| arch | a [CI] | C | N_opt [CI] | tokens per parameter at N_opt [CI] |",
       "|---|---|---|---|---|"]
  for arch, a in js["archs"].items():
    if "nd" not in a:
      L.append(f"| {arch} | skipped | – | – | – |")
      continue
    o = a.get("optimal")
    opt = (f"{_f(o['C'], '.3g')} | {_f(o['N'], '.3g')} {_ci(o['N_ci'])} | "
           f"{_f(o['tokens_per_param'], '.3g')} {_ci(o['tokens_per_param_ci'])}"
           if o else "– | no optimum (a term dropped) | –")
    L.append(f"| {arch} | {_val(a['nd'], 'n_opt_exponent', '.3f')} | {opt} |")
  return L


def _gap_md(js: dict[str, Any]) -> list[str]:
  g = js["gap"]
  L = ["## Loss gap MatMul-free - Transformer++ (from the L(N, D) fits)", ""]
  if "skipped" in g:
    return L + [f"- skipped: {g['skipped']}"]
  L += ["Positive: MatMul-free's loss is higher. Rows: fixed N, columns: fixed D (the grid's "
        "range and its geometric middle); each cell: gap [95% CI].", "",
        "| N \\ D | " + " | ".join(f"{_f(d, '.3g')}" for d in g["D"]) + " |",
        "|---" * (len(g["D"]) + 1) + "|"]
  for i, n in enumerate(g["N"]):
    L.append(f"| {_f(n, '.3g')} | " + " | ".join(
        f"{_f(g['gap'][i][j], '+.3f')} {_ci([g['lo'][i][j], g['hi'][i][j]], '+.3f')}"
        for j in range(len(g["D"]))) + " |")
  L += ["", f"- E (N, D → ∞) gap: {_f(g['E_gap'], '+.3f')} {_ci(g['E_gap_ci'], '+.3f')} "
        "(extrapolated far beyond the data)."]
  return L


def _crossover_md(js: dict[str, Any]) -> list[str]:
  p = js["paper"]
  L = ["## Crossover (MatMul-free meets Transformer++)", "",
       f"- paper (SPEC §4; values read off its Fig. 3): MatMul-free {p['slope']['mmfree']:+.2f}, "
       f"Transformer++ {p['slope']['transformer']:+.2f} loss per decade, crossing near 1e23 "
       f"FLOPs (star near {_f(p['crossover_C'], '.0e')}, loss ~{p['crossover_loss']}); lines "
       f"through the published 370M and 2.7B losses (C = 6ND): {p['points_slope']['mmfree']:+.3f} "
       f"and {p['points_slope']['transformer']:+.3f} per decade, crossing at "
       f"{_f(p['points_crossover_C'], '.2g')} (1.3B: no number in SPEC, left out)."]
  for kind in fit_lib.KINDS:
    c = js["crossover"].get(kind, {})
    if "skipped" in c or not c:
      L.append(f"- {NAMES[kind]}: skipped: {c.get('skipped', 'no fit')}")
      continue
    line = f"- {NAMES[kind]}: {c['status']}"
    if not math.isnan(float(c["frac_crossing"])):
      line += (f"; bootstrap median {_f(c['median'], '.3g')}, 95% CI {_ci(c['ci'])}, "
               f"{_pct(c['frac_crossing'])} of resamples cross in "
               f"[{_f(c['range'][0], '.2g')}, {_f(c['range'][1], '.2g')}]")
    if c["unconstrained"]:
      line += f" († unconstrained fits: {c['unconstrained']})"
    L.append(line)
  L.append("- The compute-optimal crossover uses C = 6·N·D with non-embedding N; the others the "
           "`flops` column.")
  return L


# --- the command --------------------------------------------------------------------

def run(workdir: str, paper: bool = False, n_boot: int = 200, loss_key: str = "eval_loss",
        out: str | None = None, seed: int = 0) -> dict[str, Any]:
  """Writes the figures, report.md and fit.json; returns {"analysis", "json", "files"}."""
  from mmfree_jax.scaling import plots  # noqa: PLC0415 (matplotlib only when plotting)
  rows = res_lib.load_results(workdir)
  if not rows:
    raise res_lib.ResultsError(f"{workdir}/results.csv has no finished points yet")
  out = out or workdir
  os.makedirs(out, exist_ok=True)
  formats = ("png",) if os.path.isfile(os.path.join(out, "results.csv")) else ("png", "pdf")
  analysis = fit_lib.analyze(rows, n_boot=n_boot, seed=seed, loss_key=loss_key)
  figs = {"scaling": plots.plot_scaling(analysis, paper=paper),
          "nd": plots.plot_nd(analysis),
          "gap": plots.plot_gap(analysis),
          "loss_curves": plots.plot_loss_curves(workdir)}
  if fit_lib.lr_axis(rows):
    figs["lr_sensitivity"] = plots.plot_lr_sensitivity(rows, loss_key)
  files = [p for stem, fig in figs.items()
           for p in plots.save(fig, os.path.join(out, stem), formats)]
  plots.plt.close("all")
  js = to_json(analysis)
  title = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
  paths = {"report.md": markdown(js, rows, title, res_lib.corpus(workdir, rows)),
           "fit.json": json.dumps(js, indent=2) + "\n"}
  for name, text in paths.items():
    with open(os.path.join(out, name), "w") as f:
      f.write(text)
  return {"analysis": analysis, "json": js,
          "files": files + [os.path.join(out, n) for n in paths]}


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m mmfree_jax.scaling.report", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="sweep directory holding results.csv")
  ap.add_argument("--out", default=None, help="output directory (default: --workdir)")
  ap.add_argument("--paper", action="store_true", help="add the paper's points and slopes")
  ap.add_argument("--n_boot", type=int, default=200, help="bootstrap resamples")
  ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  ap.add_argument("--loss", default="eval_loss", choices=("eval_loss", "final_loss"))
  ap.add_argument("--readme_table", action="store_true",
                  help="print the findings table of <out or workdir>/fit.json; fits nothing")
  args = ap.parse_args(argv)
  if args.n_boot < 1:
    print("error: --n_boot must be >= 1", file=sys.stderr)
    return 2
  if args.readme_table:
    path = os.path.join(args.out or args.workdir, "fit.json")
    if not os.path.isfile(path):
      print(f"error: no {path}; run the report without --readme_table first", file=sys.stderr)
      return 2
    with open(path) as f:
      print(findings_table(json.load(f)))
    return 0
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")  # files only, no window
  try:
    res = run(args.workdir, args.paper, args.n_boot, args.loss, args.out, args.seed)
  except (res_lib.ResultsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for p in res["files"]:
    print(p)
  return 0


if __name__ == "__main__":
  sys.exit(main())
