"""A results table's scaling analysis: each arch's fits with bootstrap intervals, the loss
gap between the arches, compute-optimal N(C) and crossovers (`analyze`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from mmfree_jax.scaling.fit import (ALPHA_GRID, C_MAX, ND_GRID, NDLaw, bootstrap, curve,
                                    fit_loglinear, fit_nd, fit_power_law, interval,
                                    kind_crossover, median, pairs)

KINDS = ("loglinear", "power_law", "nd")  # the fits of one arch, in report order


# --- one arch's fits ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Fitted:
  """A fit, its bootstrap refits (None: a draw that could not be fitted), the 95% intervals
  of its parameters, and why it is unconstrained ("" when it is not)."""

  law: Any
  boots: list
  ci: dict[str, tuple[float, float]]
  unconstrained: str = ""


# Parameters with intervals per kind: name -> value of a law.
PARAMS: dict[str, dict[str, Callable]] = {
    "loglinear": {"a": lambda f: f.a, "slope_per_decade": lambda f: f.slope},
    "power_law": {"E": lambda f: f.E, "A": lambda f: f.A, "alpha": lambda f: f.alpha},
    "nd": {"E": lambda f: f.E, "A": lambda f: f.A, "alpha": lambda f: f.alpha,
           "B": lambda f: f.B, "beta": lambda f: f.beta,
           "beta_minus_alpha": lambda f: f.beta - f.alpha,
           "n_opt_exponent": lambda f: f.n_opt_exponent},
}


def _unconstrained(kind: str, law, exact: bool) -> str:
  """Why a fit does not pin its parameters down ("" when it does)."""
  why = ["as many distinct points as parameters: exact interpolation"] if exact else []
  if kind == "power_law":
    if not ALPHA_GRID[0] + 1e-9 < law.alpha < ALPHA_GRID[-1] - 1e-9:
      why.append(f"alpha at its search bound ({law.alpha:g})")
    if law.A == 0:
      why.append("A = 0: a flat line")
  if kind == "nd":
    for name, v in (("alpha", law.alpha), ("beta", law.beta)):
      if not ND_GRID[0] + 1e-9 < v < ND_GRID[-1] - 1e-9:
        why.append(f"{name} at its search bound ({v:g})")
    for name, v in (("A", law.A), ("B", law.B)):
      if v == 0:
        why.append(f"{name} = 0: its term dropped")
  return "; ".join(why)


def fit_arch(c: np.ndarray, n: np.ndarray, d: np.ndarray, y: np.ndarray, n_boot: int,
             seed: int) -> tuple[dict[str, Fitted], dict[str, str]]:
  """L(C) (line, power law) and L(N, D) fits of one arch with bootstrap intervals (none for
  an exact interpolation), and the fits skipped with the reason ({kind: why})."""
  fits, skipped = {}, {}
  distinct_c = len(np.unique(c))
  distinct_nd = len(set(zip(n.tolist(), d.tolist())))
  # kind: (fit, its inputs, min distinct first input of a resample, parameters, distinct points)
  specs = {"loglinear": (fit_loglinear, (c, y), 2, 2, distinct_c),
           "power_law": (fit_power_law, (c, y), 3, 3, distinct_c),
           "nd": (fit_nd, (n, d, y), 2, 5, distinct_nd)}
  for i, (kind, (fn, arrays, need, n_params, distinct)) in enumerate(specs.items()):
    try:
      law = fn(*arrays)
    except ValueError as e:
      skipped[kind] = str(e).split(": ", 1)[-1]
      continue
    exact = distinct <= n_params
    boots = ([None] * n_boot if exact else
             bootstrap(fn, *arrays, n_boot=n_boot, seed=seed + i, min_distinct=need))
    ci = {k: interval([g(b) for b in boots if b is not None]) for k, g in PARAMS[kind].items()}
    fits[kind] = Fitted(law, boots, ci, _unconstrained(kind, law, exact))
  return fits, skipped


# --- results tables -----------------------------------------------------------------

def scaling_points(rows: Sequence[dict], loss_key: str = "eval_loss") -> dict[str, list[dict]]:
  """Rows of the scaling grid per arch, finite loss, sorted by (non-embedding params, tokens):
  those at the arch's grid LR, the peak LR used at the most model sizes, then for the most
  points (an LR axis varies the LR at one size: its other LRs are left out)."""
  out: dict[str, list[dict]] = {}
  for arch in sorted({r["arch"] for r in rows}):
    rs = [r for r in rows if r["arch"] == arch and r.get(loss_key) is not None
          and math.isfinite(float(r[loss_key]))]
    if not rs:
      continue
    by_lr: dict[float, list[dict]] = {}
    for r in rs:
      by_lr.setdefault(float(r["peak_lr"]), []).append(r)
    lr = max(sorted(by_lr), key=lambda k: (
        len({(r["d_model"], r["n_layers"]) for r in by_lr[k]}), len(by_lr[k])))
    out[arch] = sorted(by_lr[lr], key=lambda r: (float(r["non_embedding_params"]),
                                                  float(r["tokens"])))
  return out


def lr_axis(rows: Sequence[dict]) -> dict[tuple, list[dict]]:
  """Groups of >= 2 rows that differ only in peak LR: {(arch, d, L, tokens): rows by LR}."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    key = (r["arch"], int(r["d_model"]), int(r["n_layers"]), float(r["tokens"]))
    groups.setdefault(key, []).append(r)
  return {k: sorted(v, key=lambda r: float(r["peak_lr"])) for k, v in groups.items()
          if len({float(r["peak_lr"]) for r in v}) >= 2}


def nd_gap(law1: NDLaw, law2: NDLaw, draws: Sequence[tuple], n, d
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """L1(N, D) - L2(N, D) and its 95% interval over paired bootstrap refits `draws`."""
  point = law1(n, d) - law2(n, d)
  if not draws:
    nan = np.full(np.shape(point), math.nan)
    return point, nan, nan
  g = np.array([f1(n, d) - f2(n, d) for f1, f2 in draws])
  lo, hi = np.quantile(g, [0.025, 0.975], axis=0, method="inverted_cdf")
  return point, lo, hi


def analyze(rows: Sequence[dict], n_boot: int = 200, seed: int = 0, loss_key: str = "eval_loss",
            archs: tuple[str, str] = ("mmfree", "transformer")) -> dict[str, Any]:
  """Per arch: L(C) line and power law (C = the `flops` column) and L(N, D) (N = non-embedding
  params, D = tokens) with bootstrap intervals; between `archs`: the L(N, D) loss gap on a
  3 x 3 (N, D) grid spanning the data, and the crossover compute of each kind of fit."""
  pts = scaling_points(rows, loss_key)
  res: dict[str, Any] = {"archs": {}, "n_boot": n_boot, "seed": seed, "loss_key": loss_key}
  for arch, rs in pts.items():
    col = {k: np.array([float(r[k]) for r in rs])
           for k in ("flops", "non_embedding_params", "tokens", loss_key)}
    fits, skipped = fit_arch(col["flops"], col["non_embedding_params"], col["tokens"],
                             col[loss_key], n_boot, seed)
    res["archs"][arch] = {"n": len(rs), "names": [r["name"] for r in rs],
                          "flops": col["flops"].tolist(), "loss": col[loss_key].tolist(),
                          "N": col["non_embedding_params"].tolist(),
                          "D": col["tokens"].tolist(), "fits": fits, "skipped": skipped}
  _optimal(res)
  res["gap"] = _gap(res, archs, seed)
  res["crossover"] = _crossovers(res, archs, seed)
  return res


def _optimal(res: dict):
  """Per arch with an L(N, D) optimum: N_opt and its tokens per parameter at the largest
  C = 6ND of the grid, with intervals (`a["optimal"]`)."""
  c = max((6 * n * d for a in res["archs"].values() for n, d in zip(a["N"], a["D"])),
          default=None)
  for a in res["archs"].values():
    f = a["fits"].get("nd")
    if f is None or not f.law.has_optimum:
      continue
    n = float(f.law.optimal_n(c))
    n_b = [float(b.optimal_n(c)) for b in f.boots if b is not None]
    a["optimal"] = {"C": c, "N": n, "N_ci": interval(n_b), "tokens_per_param": c / 6 / n ** 2,
                    "tokens_per_param_ci": interval([c / 6 / x ** 2 for x in n_b])}


def _both(res: dict, archs: tuple[str, str], kind: str) -> str:
  """Why `kind` cannot compare the two arches ("" when it can)."""
  for arch in archs:
    if arch not in res["archs"]:
      return f"no {arch} points"
    a = res["archs"][arch]
    if kind not in a["fits"]:
      return f"{arch}: {a['skipped'][kind]}"
  return ""


def _gap(res: dict, archs: tuple[str, str], seed: int) -> dict[str, Any]:
  why = _both(res, archs, "nd")
  if why:
    return {"skipped": why}
  a1, a2 = (res["archs"][a] for a in archs)
  n_all, d_all = a1["N"] + a2["N"], a1["D"] + a2["D"]
  n_ref = np.geomspace(min(n_all), max(n_all), 3)
  d_ref = np.geomspace(min(d_all), max(d_all), 3)
  f1, f2 = a1["fits"]["nd"], a2["fits"]["nd"]
  paired = a1["n"] == a2["n"]
  draws = pairs(f1.boots, f2.boots, paired, seed + 10)
  g, lo, hi = nd_gap(f1.law, f2.law, draws, n_ref[:, None], d_ref[None, :])
  return {"N": n_ref.tolist(), "D": d_ref.tolist(), "gap": g.tolist(), "lo": lo.tolist(),
          "hi": hi.tolist(), "paired": paired, "draws": draws,
          "E_gap": f1.law.E - f2.law.E,
          "E_gap_ci": interval([b1.E - b2.E for b1, b2 in draws])}


def _crossovers(res: dict, archs: tuple[str, str], seed: int) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, kind in enumerate(KINDS):
    why = _both(res, archs, kind)
    if why:
      out[kind] = {"skipped": why}
      continue
    a1, a2 = (res["archs"][a] for a in archs)
    f1, f2 = a1["fits"][kind], a2["fits"][kind]
    if kind == "nd":  # C = 6 N D with N the non-embedding params
      lo = min(6 * n * d for a in (a1, a2) for n, d in zip(a["N"], a["D"]))
    else:
      lo = min(a1["flops"] + a2["flops"])
    try:
      point = kind_crossover(kind, f1.law, f2.law, lo)
    except ValueError as e:
      out[kind] = {"skipped": str(e)}
      continue
    paired = a1["n"] == a2["n"]
    cs = []
    for b1, b2 in pairs(f1.boots, f2.boots, paired, seed + 20 + k):
      try:
        x = kind_crossover(kind, b1, b2, lo)
      except ValueError:
        continue
      cs.append(math.inf if x is None else x)
    unc = "; ".join(f"{a}: {f.unconstrained}" for a, f in zip(archs, (f1, f2))
                    if f.unconstrained)
    out[kind] = {"C": point, "median": median(cs), "ci": interval(cs),
                 "frac_crossing": float(np.mean(np.isfinite(cs))) if cs else math.nan,
                 "paired": paired, "range": (lo, C_MAX),
                 "loss_at_C": None if point is None else float(curve(kind, f1.law)(point)),
                 "status": _status(point, cs, lo, archs, f1.law, f2.law, kind),
                 "unconstrained": unc}
  return out


def _status(point: float | None, cs: list[float], lo: float, archs: tuple[str, str],
            law1, law2, kind: str) -> str:
  frac = float(np.mean(np.isfinite(cs))) if cs else math.nan
  if point is None:
    status = f"no crossover in [{lo:.2g}, {C_MAX:.2g}] FLOPs"
    if not cs:
      status += " (no bootstrap)"
    elif frac >= 0.05:
      status += f" (though {100 * frac:.0f}% of bootstrap resamples cross: not excluded)"
    return status
  if not cs:
    status = f"crossover at {point:.2g} FLOPs (no bootstrap)"
  elif frac < 0.5:
    status = (f"crossover at {point:.2g} FLOPs but not robust: only {100 * frac:.0f}% of "
              "bootstrap resamples cross in range")
  else:
    status = f"crossover at {point:.2g} FLOPs"
  c1, c2 = curve(kind, law1), curve(kind, law2)
  before = archs[1] if c1(point / 10) > c2(point / 10) else archs[0]
  after = archs[0] if before == archs[1] else archs[1]
  return status + f" ({before} lower before, {after} lower after)"
