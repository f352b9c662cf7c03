"""Scaling-law fits in numpy: L(C), L(N, D), compute-optimal allocation, crossovers, bootstrap.

    L(C)    = a + slope * log10(C)                   `fit_loglinear(C, L)` (the paper's lines)
    L(C)    = E + A * C^-alpha                       `fit_power_law(C, L)`
    L(N, D) = E + A / N^alpha + B / D^beta           `fit_nd(N, D, L)`
    under C = 6 N D: N_opt = G (C/6)^(beta/(alpha+beta))   `NDLaw.optimal_n`, `.optimal_loss`

Method (variable projection): for fixed exponents the model is linear in (E, A[, B]);
those come from an exact non-negative least squares (E, A, B >= 0; every active set is
tried), the exponents from a grid search refined around the best cell. Inputs are divided
by their geometric mean for conditioning; reported coefficients are for raw C, N, D.
Intervals: 95% percentile bootstrap over points (resample with replacement, refit; a
resample the model cannot be fitted to counts as a failed draw).
`analyze(rows)` does all of it for a results table of both arches: fits, the loss gap
between the arches, compute-optimal N(C), crossovers.
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
KINDS = ("loglinear", "power_law", "nd")  # the fits of one arch, in report order


def _batched_nnls(X_GxNxK: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Exact NNLS for G design matrices of a few columns: (coef [G, K], sse [G])."""
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


def _exp(log_x: float) -> float:
  return math.exp(log_x) if log_x > -700 else 0.0


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """L(C) = E + A * C^-alpha (A for C in raw units: stored as log_A)."""

  E: float
  log_A: float
  alpha: float
  sse: float = 0.0

  @property
  def A(self) -> float:
    return _exp(self.log_A)

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
    return _exp(self.log_A)

  @property
  def B(self) -> float:
    return _exp(self.log_B)

  @property
  def has_optimum(self) -> bool:
    """Both terms present: loss at fixed C = 6ND has a finite best N."""
    return self.A > 0 and self.B > 0 and self.alpha > 0 and self.beta > 0

  @property
  def n_opt_exponent(self) -> float:
    """a of N_opt ∝ C^a under C = 6ND: beta / (alpha + beta) (D_opt ∝ C^(1-a))."""
    return self.beta / (self.alpha + self.beta) if self.has_optimum else math.nan

  def __call__(self, n, d) -> np.ndarray:
    n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
    return (self.E + np.exp(self.log_A - self.alpha * np.log(n))
            + np.exp(self.log_B - self.beta * np.log(d)))

  def optimal_n(self, c) -> np.ndarray:
    """N minimising L(N, C / 6N): alpha A N^-alpha = beta B D^-beta (nan without optimum)."""
    c = np.asarray(c, np.float64)
    if not self.has_optimum:
      return np.full(c.shape, math.nan)
    log_g = math.log(self.alpha / self.beta) + self.log_A - self.log_B
    return np.exp((log_g + self.beta * np.log(c / 6.0)) / (self.alpha + self.beta))

  def optimal_loss(self, c) -> np.ndarray:
    """Loss of the compute-optimal model at C = 6ND."""
    n = self.optimal_n(c)
    return self(n, np.asarray(c, np.float64) / (6.0 * n))


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
  independently: >= 5 distinct (N, D) points, not all on one line in (log N, log D))."""
  n, d, y = (np.asarray(v, np.float64) for v in (n, d, loss))
  _check_xy(n, y, 1, "fit_nd")
  _check_xy(d, y, 1, "fit_nd")
  if not varies_both(n, d) or len(set(zip(n.tolist(), d.tolist()))) < 5:
    raise ValueError("fit_nd: N and D must vary independently (>= 5 distinct points, not "
                     "all on one line in log N, log D); fit L(C) instead")
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
  return NDLaw(float(e), float(log_a), float(alpha), float(log_b), float(beta), float(sse))


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


def curve(kind: str, law) -> Callable:
  """Loss as a function of compute for a fit of `kind` (L(N, D): the compute-optimal one)."""
  if kind == "nd":
    if not law.has_optimum:
      raise ValueError("L(N, D) with a dropped term has no compute-optimal curve")
    return law.optimal_loss
  return law


def kind_crossover(kind: str, law1, law2, lo: float, hi: float = C_MAX) -> float | None:
  """Crossover compute of two fits of `kind` in [lo, hi] (None: they do not cross there)."""
  if kind == "loglinear":
    return loglinear_crossover(law1, law2, lo, hi)
  return crossover(curve(kind, law1), curve(kind, law2), lo, hi)


def bootstrap(fit: Callable[..., Any], *arrays: Sequence[float], n_boot: int = 200,
              seed: int = 0, min_distinct: int = 3) -> list[Any]:
  """Fits of `n_boot` resamples (rows drawn with replacement) of the parallel `arrays`; None
  for a draw with fewer than `min_distinct` distinct x or that `fit` rejects. The i-th entry
  always belongs to the i-th draw: two tables of the same length and seed get the same draws
  (a paired bootstrap)."""
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
    out.append(f)
  return out


def interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
  """Percentile interval (inf values count: 'beyond the range'; nan values are dropped)."""
  v = np.asarray(values, np.float64)
  v = v[~np.isnan(v)]
  if len(v) == 0:
    return (math.nan, math.nan)
  q = (1 - level) / 2  # order statistics, no interpolation (an inf stays inf)
  return (float(np.quantile(v, q, method="inverted_cdf")),
          float(np.quantile(v, 1 - q, method="inverted_cdf")))


def median(values: Sequence[float]) -> float:
  v = np.asarray(values, np.float64)
  return float(np.quantile(v, 0.5, method="inverted_cdf")) if len(v) else math.nan


def pairs(boots1: Sequence, boots2: Sequence, paired: bool, seed: int = 0) -> list[tuple]:
  """Bootstrap refits of two arches taken together: the i-th with the i-th when `paired`
  (same grid: both resample the same grid positions, so what the arches share does not
  count as disagreement), else each with a seeded random draw of the other's."""
  rng = np.random.default_rng(seed)
  out = []
  for i, f1 in enumerate(boots1):
    f2 = boots2[i if paired else int(rng.integers(0, len(boots2)))]
    if f1 is not None and f2 is not None:
      out.append((f1, f2))
  return out


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
