"""Scaling-law fits in numpy: L(C), L(N, D), log-linear lines, crossovers, bootstrap.

    L(C)    = E + A * C^-alpha                       `fit_power_law(C, L)`
    L(N, D) = E + A / N^alpha + B / D^beta           `fit_nd(N, D, L)`
    L(C)    = a + slope * log10(C)                   `fit_loglinear(C, L)` (the paper's lines)

Method (variable projection): for fixed exponents the model is linear in (E, A[, B]);
those come from an exact non-negative least squares (E, A, B >= 0; every active set is
tried), the exponents from a grid search refined around the best cell. Inputs are divided
by their geometric mean for conditioning; reported coefficients are for raw C, N, D.
Intervals: percentile bootstrap over points (resample with replacement, refit; resamples
with fewer distinct x than the model has parameters are skipped).
`analyze(rows)` does all of it for a results table of both arches, crossover included.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Sequence

import numpy as np

ALPHA_GRID = np.linspace(0.002, 2.0, 400)
ND_GRID = np.linspace(0.01, 1.5, 50)
C_MAX = 1e27  # upper end of the "sensible" crossover range (beyond frontier training runs)


def _nnls_small(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
  """Exact NNLS for a few columns: best feasible least squares over all active sets."""
  k = X.shape[1]
  best, best_sse = np.zeros(k), float(np.sum(y ** 2))
  for r in range(1, k + 1):
    for cols in itertools.combinations(range(k), r):
      sub = X[:, cols]
      coef, *_ = np.linalg.lstsq(sub, y, rcond=None)
      if np.all(coef >= 0):
        sse = float(np.sum((sub @ coef - y) ** 2))
        if sse < best_sse - 1e-15:
          best = np.zeros(k)
          best[list(cols)] = coef
          best_sse = sse
  return best, best_sse


def _batched_nnls(X_GxNxK: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`_nnls_small` for G design matrices at once: (coef [G, K], sse [G])."""
  g, _, k = X_GxNxK.shape
  best = np.zeros((g, k))
  best_sse = np.full(g, float(np.sum(y ** 2)))
  for r in range(1, k + 1):
    for cols in itertools.combinations(range(k), r):
      sub = X_GxNxK[:, :, cols]
      xtx = np.einsum("gnk,gnj->gkj", sub, sub) + 1e-12 * np.eye(r)
      xty = np.einsum("gnk,n->gk", sub, y)
      coef = np.linalg.solve(xtx, xty[..., None])[..., 0]
      sse = np.sum((np.einsum("gnk,gk->gn", sub, coef) - y) ** 2, axis=1)
      ok = np.all(coef >= 0, axis=1) & (sse < best_sse - 1e-15)
      full = np.zeros((g, k))
      full[:, list(cols)] = coef
      best = np.where(ok[:, None], full, best)
      best_sse = np.where(ok, sse, best_sse)
  return best, best_sse


def _geomean(x: np.ndarray) -> float:
  return float(np.exp(np.mean(np.log(x))))


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """L(C) = E + A * C^-alpha (A for C in raw units: stored as log_A)."""

  E: float
  log_A: float
  alpha: float
  sse: float = 0.0

  @property
  def A(self) -> float:
    return math.exp(self.log_A) if self.log_A > -700 else 0.0

  def __call__(self, c) -> np.ndarray:
    c = np.asarray(c, np.float64)
    return self.E + np.exp(self.log_A - self.alpha * np.log(c))


@dataclasses.dataclass(frozen=True)
class NDLaw:
  """L(N, D) = E + A / N^alpha + B / D^beta."""

  E: float
  log_A: float
  alpha: float
  log_B: float
  beta: float
  sse: float = 0.0

  @property
  def A(self) -> float:
    return math.exp(self.log_A)

  @property
  def B(self) -> float:
    return math.exp(self.log_B)

  def __call__(self, n, d) -> np.ndarray:
    n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
    return (self.E + np.exp(self.log_A - self.alpha * np.log(n))
            + np.exp(self.log_B - self.beta * np.log(d)))


@dataclasses.dataclass(frozen=True)
class LogLinear:
  """L(C) = a + slope * log10(C); `slope` is the loss change per decade of compute."""

  a: float
  slope: float
  sse: float = 0.0

  def __call__(self, c) -> np.ndarray:
    return self.a + self.slope * np.log10(np.asarray(c, np.float64))


def _check_xy(x: np.ndarray, y: np.ndarray, n_params: int, what: str):
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"{what}: x and loss must be 1-D arrays of the same length")
  if not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)) or np.any(x <= 0):
    raise ValueError(f"{what}: inputs must be finite and x > 0")
  if len(np.unique(x)) < n_params:
    raise ValueError(f"{what}: needs at least {n_params} distinct x values, got "
                     f"{len(np.unique(x))}")


def fit_power_law(c: Sequence[float], loss: Sequence[float],
                  alpha_grid: np.ndarray = ALPHA_GRID) -> PowerLaw:
  """Least-squares L(C) = E + A C^-alpha with E, A >= 0 (needs >= 3 distinct C)."""
  c, y = np.asarray(c, np.float64), np.asarray(loss, np.float64)
  _check_xy(c, y, 3, "fit_power_law")
  ref = _geomean(c)
  lc = np.log(c / ref)

  def profile(alphas: np.ndarray):
    x = np.exp(-alphas[:, None] * lc[None, :])
    X = np.stack([np.ones_like(x), x], axis=-1)
    return _batched_nnls(X, y)

  grid = np.asarray(alpha_grid, np.float64)
  for _ in range(5):  # coarse grid, then finer grids around the best cell
    coef, sse = profile(grid)
    i = int(np.argmin(sse))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best = (grid[i], coef[i], sse[i])
    grid = np.linspace(lo, hi, 41)
  alpha, (e, a), sse = best
  log_a = math.log(a) + alpha * math.log(ref) if a > 0 else -math.inf
  return PowerLaw(float(e), float(log_a), float(alpha), float(sse))


def fit_nd(n: Sequence[float], d: Sequence[float], loss: Sequence[float],
           grid: np.ndarray = ND_GRID) -> NDLaw:
  """Least-squares L(N, D) = E + A/N^alpha + B/D^beta, E, A, B >= 0 (needs N and D to vary
  independently: >= 5 points not on one line in (log N, log D))."""
  n, d, y = (np.asarray(v, np.float64) for v in (n, d, loss))
  _check_xy(n, y, 2, "fit_nd")
  _check_xy(d, y, 2, "fit_nd")
  if not varies_both(n, d) or len(y) < 5:
    raise ValueError("fit_nd: N and D must vary independently (>= 5 points, not all on one "
                     "line in log N, log D); fit L(C) instead")
  rn, rd = _geomean(n), _geomean(d)
  ln, ld = np.log(n / rn), np.log(d / rd)

  def profile(al: np.ndarray, be: np.ndarray):
    xa = np.exp(-al[:, None] * ln[None, :])
    xb = np.exp(-be[:, None] * ld[None, :])
    X = np.stack([np.ones_like(xa), xa, xb], axis=-1)
    return _batched_nnls(X, y)

  ga = gb = np.asarray(grid, np.float64)
  for _ in range(3):
    al, be = (v.ravel() for v in np.meshgrid(ga, gb, indexing="ij"))
    coef, sse = profile(al, be)
    i = int(np.argmin(sse))
    best = (al[i], be[i], coef[i], sse[i])
    ia, ib = np.unravel_index(i, (len(ga), len(gb)))
    ga = np.linspace(ga[max(ia - 1, 0)], ga[min(ia + 1, len(ga) - 1)], 21)
    gb = np.linspace(gb[max(ib - 1, 0)], gb[min(ib + 1, len(gb) - 1)], 21)
  alpha, beta, (e, a, b), sse = best
  log_a = math.log(a) + alpha * math.log(rn) if a > 0 else -math.inf
  log_b = math.log(b) + beta * math.log(rd) if b > 0 else -math.inf
  return NDLaw(float(e), log_a, float(alpha), log_b, float(beta), float(sse))


def varies_both(n: Sequence[float], d: Sequence[float], tol: float = 1e-3) -> bool:
  """True when (log N, log D) points do not all lie on one line (N and D vary independently)."""
  ln, ld = np.log(np.asarray(n, np.float64)), np.log(np.asarray(d, np.float64))
  if len(ln) < 3:
    return False
  M = np.stack([np.ones_like(ln), ln, ld], axis=1)
  s = np.linalg.svd(M - M.mean(0), compute_uv=False)
  return bool(s[-2] > tol * max(s[0], 1e-12))  # two independent directions


def fit_loglinear(c: Sequence[float], loss: Sequence[float]) -> LogLinear:
  """Least-squares line in (log10 C, loss) (needs >= 2 distinct C)."""
  c, y = np.asarray(c, np.float64), np.asarray(loss, np.float64)
  _check_xy(c, y, 2, "fit_loglinear")
  slope, a = np.polyfit(np.log10(c), y, 1)
  sse = float(np.sum((a + slope * np.log10(c) - y) ** 2))
  return LogLinear(float(a), float(slope), sse)


def crossover(f1: Callable, f2: Callable, lo: float, hi: float = C_MAX,
              n: int = 4001) -> float | None:
  """Smallest C in [lo, hi] where f1(C) - f2(C) changes sign (None if it never does)."""
  if not (0 < lo < hi):
    raise ValueError(f"crossover range must satisfy 0 < lo < hi, got [{lo}, {hi}]")
  lc = np.linspace(math.log(lo), math.log(hi), n)
  g = np.asarray(f1(np.exp(lc)) - f2(np.exp(lc)), np.float64)
  s = np.sign(g)
  if s[0] == 0:
    return float(lo)
  idx = np.nonzero(s[1:] * s[:-1] <= 0)[0]
  if len(idx) == 0:
    return None
  a, b = lc[idx[0]], lc[idx[0] + 1]
  fa = float(f1(math.exp(a)) - f2(math.exp(a)))
  for _ in range(100):  # bisection in log C
    m = 0.5 * (a + b)
    fm = float(f1(math.exp(m)) - f2(math.exp(m)))
    if (fm > 0) == (fa > 0) and fm != 0:
      a, fa = m, fm
    else:
      b = m
  return float(math.exp(0.5 * (a + b)))


def loglinear_crossover(l1: LogLinear, l2: LogLinear, lo: float = 0.0,
                        hi: float = math.inf) -> float | None:
  """C where two lines meet, if inside [lo, hi] (None for parallel lines or outside)."""
  if l1.slope == l2.slope:
    return None
  x = (l2.a - l1.a) / (l1.slope - l2.slope)
  if x > 300:
    return None
  c = 10.0 ** x
  return c if lo <= c <= hi else None


def bootstrap(fit: Callable[..., Any], *arrays: Sequence[float], n_boot: int = 200,
              seed: int = 0, min_distinct: int = 3, keep_failed: bool = False) -> list[Any]:
  """Fits of `n_boot` resamples (rows drawn with replacement) of the parallel `arrays`.

  Resamples with fewer than `min_distinct` distinct x are dropped, or kept as None with
  `keep_failed` (then the i-th entry always belongs to the i-th draw: two tables of the same
  length and seed get the same draws, i.e. a paired bootstrap).
  """
  arrays = [np.asarray(a, np.float64) for a in arrays]
  n = len(arrays[0])
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n_boot):
    idx = rng.integers(0, n, n)
    f = None
    if len(np.unique(arrays[0][idx])) >= min_distinct:
      try:
        f = fit(*(a[idx] for a in arrays))
      except ValueError:
        f = None
    if f is not None or keep_failed:
      out.append(f)
  return out


def interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
  """Percentile interval (inf values count: 'beyond the range')."""
  v = np.asarray(values, np.float64)
  if len(v) == 0:
    return (math.nan, math.nan)
  q = (1 - level) / 2  # order statistics, no interpolation (an inf stays inf)
  return (float(np.quantile(v, q, method="inverted_cdf")),
          float(np.quantile(v, 1 - q, method="inverted_cdf")))


def median(values: Sequence[float]) -> float:
  v = np.asarray(values, np.float64)
  return float(np.quantile(v, 0.5, method="inverted_cdf")) if len(v) else math.nan


# --- results tables -----------------------------------------------------------------

def scaling_points(rows: Sequence[dict], loss_key: str = "eval_loss") -> dict[str, list[dict]]:
  """Rows of the compute axis per arch: at each arch's most common peak LR (an LR-axis
  point at another LR is left out), finite loss, sorted by FLOPs."""
  out: dict[str, list[dict]] = {}
  for arch in sorted({r["arch"] for r in rows}):
    rs = [r for r in rows if r["arch"] == arch and r.get(loss_key) is not None
          and math.isfinite(float(r[loss_key]))]
    if not rs:
      continue
    lrs = [float(r["peak_lr"]) for r in rs]
    mode = max(sorted(set(lrs)), key=lrs.count)
    out[arch] = sorted([r for r in rs if float(r["peak_lr"]) == mode],
                       key=lambda r: float(r["flops"]))
  return out


def lr_axis(rows: Sequence[dict]) -> dict[tuple, list[dict]]:
  """Groups of >= 2 rows that differ only in peak LR: {(arch, d, L, tokens): rows by LR}."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    key = (r["arch"], int(r["d_model"]), int(r["n_layers"]), float(r["tokens"]))
    groups.setdefault(key, []).append(r)
  return {k: sorted(v, key=lambda r: float(r["peak_lr"])) for k, v in groups.items()
          if len({float(r["peak_lr"]) for r in v}) >= 2}


def _summary_ci(fits: list, names: Sequence[str]) -> dict[str, tuple[float, float]]:
  return {k: interval([getattr(f, k) for f in fits if f is not None]) for k in names}


def analyze(rows: Sequence[dict], n_boot: int = 200, seed: int = 0, loss_key: str = "eval_loss",
            c_range: tuple[float | None, float] = (None, C_MAX),
            archs: tuple[str, str] = ("mmfree", "transformer")) -> dict[str, Any]:
  """Fits per arch (power law, log-linear, L(N, D) when possible) with bootstrap intervals,
  and the crossover compute of `archs[0]` and `archs[1]` with its interval."""
  pts = scaling_points(rows, loss_key)
  res: dict[str, Any] = {"archs": {}, "n_boot": n_boot, "loss_key": loss_key}
  all_c = [float(r["flops"]) for v in pts.values() for r in v]
  lo = c_range[0] or (min(all_c) if all_c else 1.0)
  hi = c_range[1]
  res["c_range"] = (lo, hi)
  for arch, rs in pts.items():
    c = np.array([float(r["flops"]) for r in rs])
    y = np.array([float(r[loss_key]) for r in rs])
    a: dict[str, Any] = {"n": len(rs), "flops": c.tolist(), "loss": y.tolist(),
                         "names": [r["name"] for r in rs]}
    if len(np.unique(c)) >= 2:
      ll = fit_loglinear(c, y)
      boots = bootstrap(fit_loglinear, c, y, n_boot=n_boot, seed=seed, min_distinct=2,
                        keep_failed=True)
      a["loglinear"] = ll
      a["loglinear_boot"] = boots
      a["loglinear_ci"] = _summary_ci(boots, ("a", "slope"))
    if len(np.unique(c)) >= 3:
      pl = fit_power_law(c, y)
      notes = []
      if len(np.unique(c)) == 3:  # every usable resample is the full set: no interval
        boots = [None] * n_boot
        notes.append("exact interpolation (3 points, 3 parameters): no residual degrees of "
                     "freedom, no bootstrap interval")
      else:
        boots = bootstrap(fit_power_law, c, y, n_boot=n_boot, seed=seed + 1, keep_failed=True)
      if pl.alpha >= ALPHA_GRID[-1] - 1e-9 or pl.alpha <= ALPHA_GRID[0] + 1e-9:
        notes.append(f"alpha at its search bound ({pl.alpha:g}): the data do not constrain "
                     "the power law")
      a["power_law"] = pl
      a["power_law_boot"] = boots
      a["power_law_ci"] = _summary_ci(boots, ("E", "A", "alpha"))
      a["power_law_note"] = "; ".join(notes)
    n = np.array([float(r["non_embedding_params"]) for r in rs])
    d = np.array([float(r["tokens"]) for r in rs])
    if len(rs) >= 5 and varies_both(n, d):
      a["nd"] = fit_nd(n, d, y)
    else:
      a["nd_note"] = "L(N, D) not fitted: N and D do not vary independently in this grid"
    res["archs"][arch] = a
  res["crossover"] = _crossover_report(res, archs, lo, hi, seed)
  return res


def _crossover_report(res: dict, archs: tuple[str, str], lo: float, hi: float,
                      seed: int) -> dict[str, Any]:
  out: dict[str, Any] = {}
  if not all(a in res["archs"] for a in archs):
    return {"status": f"needs both {archs[0]} and {archs[1]} points"}
  a1, a2 = (res["archs"][a] for a in archs)
  rng = np.random.default_rng(seed + 2)
  for kind, fn in (("power_law", lambda f1, f2: crossover(f1, f2, lo, hi)),
                   ("loglinear", lambda f1, f2: loglinear_crossover(f1, f2, lo, hi))):
    if kind not in a1 or kind not in a2:
      continue
    point = fn(a1[kind], a2[kind])
    b1, b2 = a1[f"{kind}_boot"], a2[f"{kind}_boot"]
    # Same grid for both arches (same number of points): paired bootstrap, the i-th draw of
    # one arch's points goes with the i-th of the other's (sizes resampled together, so a
    # shared curvature does not count as disagreement). Otherwise independent pairs.
    paired = a1["n"] == a2["n"]
    cs = []
    for i in range(len(b1)):
      j = i if paired else int(rng.integers(0, len(b2)))
      if b1[i] is None or b2[j] is None:
        continue
      x = fn(b1[i], b2[j])
      cs.append(math.inf if x is None else x)
    frac = float(np.mean(np.isfinite(cs))) if cs else math.nan
    mid = median(cs)
    ci = interval(cs)
    if point is None:
      status = f"no crossover in [{lo:.2g}, {hi:.2g}] FLOPs"
      if not cs:
        status += " (no bootstrap: too few points)"
      elif frac >= 0.05:
        status += f" (though {100 * frac:.0f}% of bootstrap resamples cross: not excluded)"
    elif not cs:
      status = f"crossover at {point:.2g} FLOPs (no bootstrap: too few points)"
    elif frac < 0.5:
      status = (f"crossover at {point:.2g} FLOPs but not robust: only {100 * frac:.0f}% of "
                "bootstrap resamples cross in range")
    else:
      status = f"crossover at {point:.2g} FLOPs"
    if point is not None:
      before = archs[1] if a1[kind](point / 10) > a2[kind](point / 10) else archs[0]
      after = archs[0] if before == archs[1] else archs[1]
      status += f" ({before} lower before, {after} lower after)"
    out[kind] = {"C": point, "median": mid, "ci": ci, "frac_crossing": frac, "paired": paired,
                 "loss_at_C": None if point is None else float(a1[kind](point)),
                 "status": status}
  return out
