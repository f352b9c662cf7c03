"""Scaling-law fits in numpy: L(C), L(N, D), compute-optimal allocation, crossovers, bootstrap."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Sequence

import numpy as np

#     L(C)    = a + slope * log10(C)                   `fit_loglinear(C, L)` (the paper's lines)
#     L(C)    = E + A * C^-alpha                       `fit_power_law(C, L)`
#     L(N, D) = E + A / N^alpha + B / D^beta           `fit_nd(N, D, L)`
#     under C = 6 N D: N_opt = G (C/6)^(beta/(alpha+beta))   `NDLaw.optimal_n`, `.optimal_loss`
#
# Method (variable projection): for fixed exponents the model is linear in (E, A[, B]);
# those come from an exact non-negative least squares (E, A, B >= 0; every active set is
# tried), the exponents from a grid search refined around the best cell. Inputs are divided
# by their geometric mean for conditioning; reported coefficients are for raw C, N, D.
# Intervals: 95% percentile bootstrap over points (resample with replacement, refit; a
# resample the model cannot be fitted to counts as a failed draw).
# `analysis.analyze(rows)` applies them to a results table of both arches.

ALPHA_GRID = np.linspace(0.002, 2.0, 400)
ND_GRID = np.linspace(0.01, 1.5, 50)
C_MAX = 1e27  # upper end of the "sensible" crossover range (beyond frontier training runs)


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
