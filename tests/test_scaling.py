"""Scaling-law fitting, crossovers, figures, the corpus helper and the planning model."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from mmfree_jax.config import ModelConfig, preset
from mmfree_jax.scaling import corpus, fit, flops, plots, report
from mmfree_jax.scaling import results as res_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = np.geomspace(1e17, 1e21, 9)


def test_power_law_recovers_exact_and_noisy_laws():
  """Exact data: E, alpha to 1e-5 relative, A to 1e-4. Noise sd 0.005 on 9 points spanning
  4 decades: the 95% bootstrap intervals contain the true E and alpha, estimates within
  0.05 of E and 0.01 of alpha."""
  true = fit.PowerLaw(1.7, math.log(2.0e3), 0.17)
  f = fit.fit_power_law(C, true(C))
  assert f.E == pytest.approx(1.7, rel=1e-5) and f.alpha == pytest.approx(0.17, rel=1e-5)
  assert f.A == pytest.approx(2.0e3, rel=1e-4)
  y = true(C) + np.random.default_rng(0).normal(0, 0.005, C.size)
  f = fit.fit_power_law(C, y)
  boots = fit.bootstrap(fit.fit_power_law, C, y, n_boot=200)
  assert len(boots) > 190
  lo, hi = fit.interval([b.alpha for b in boots])
  assert lo < 0.17 < hi and abs(f.alpha - 0.17) < 0.01
  lo, hi = fit.interval([b.E for b in boots])
  assert lo < 1.7 < hi and abs(f.E - 1.7) < 0.05


def test_power_law_without_floor_and_errors():
  f = fit.fit_power_law(C, 3.0 * (C / 1e19) ** -0.05)  # E = 0 is a bound, not a guess
  assert f.E == pytest.approx(0.0, abs=1e-6) and f.alpha == pytest.approx(0.05, rel=1e-4)
  with pytest.raises(ValueError, match="at least 3 distinct"):
    fit.fit_power_law([1e18, 1e18, 1e19], [3.0, 3.0, 2.9])
  with pytest.raises(ValueError, match="x > 0"):
    fit.fit_power_law([0.0, 1e18, 1e19], [3.0, 3.0, 2.9])


def test_nd_law_recovers_chinchilla_like_parameters():
  """Hoffmann et al.'s law on a 5x3 (N, D) grid: exponents to 1e-3, E to 1e-3 relative."""
  n = np.repeat(np.geomspace(1e6, 1e8, 5), 3)
  d = np.tile([1e8, 1e9, 1e10], 5)
  true = fit.NDLaw(1.69, math.log(406.4), 0.34, math.log(410.7), 0.28)
  f = fit.fit_nd(n, d, true(n, d))
  assert f.alpha == pytest.approx(0.34, abs=1e-3) and f.beta == pytest.approx(0.28, abs=1e-3)
  assert f.E == pytest.approx(1.69, rel=1e-3)
  assert f.A == pytest.approx(406.4, rel=2e-2) and f.B == pytest.approx(410.7, rel=2e-2)
  assert not fit.varies_both(n[::3], 20 * n[::3])  # D = 20 N: one line, not a grid
  with pytest.raises(ValueError, match="vary independently"):
    fit.fit_nd(n[::3], 20 * n[::3], true(n[::3], 20 * n[::3]))


def test_loglinear_and_the_papers_crossover():
  f = fit.fit_loglinear(C, 5.0 - 0.3 * np.log10(C))
  assert f.slope == pytest.approx(-0.3, abs=1e-12) and f.a == pytest.approx(5.0, abs=1e-9)
  pts = res_lib.paper_points()
  lines = {a: fit.fit_loglinear([p["flops"] for p in pts if p["arch"] == a],
                                [p["final_loss"] for p in pts if p["arch"] == a])
           for a in ("mmfree", "transformer")}
  # SPEC §4: the lines cross near 1e23 (star near 6e22, loss ~1.7).
  c = fit.loglinear_crossover(lines["mmfree"], lines["transformer"])
  assert 4e22 < c < 9e22
  assert lines["mmfree"](c) == pytest.approx(1.6, abs=0.1)
  assert lines["mmfree"].slope == pytest.approx(-0.392, abs=2e-3)
  assert lines["transformer"].slope == pytest.approx(-0.304, abs=2e-3)


def test_crossover_of_two_known_laws():
  """Same exponent: E1 + A1 x = E2 + A2 x at x = C^-a = (E2 - E1) / (A1 - A2)."""
  f1 = fit.PowerLaw(1.5, math.log(400.0), 0.1)  # higher at small C, lower floor
  f2 = fit.PowerLaw(1.8, math.log(200.0), 0.1)
  want = ((1.8 - 1.5) / (400.0 - 200.0)) ** (-1 / 0.1)
  got = fit.crossover(f1, f2, 1e10, 1e40)
  assert got == pytest.approx(want, rel=1e-9)
  assert fit.crossover(f1, f2, 1e10, want / 2) is None  # outside the range
  g2 = fit.PowerLaw(1.4, math.log(300.0), 0.1)  # below f1 everywhere: never crosses
  assert fit.crossover(f1, g2, 1e10, 1e40) is None
  l1, l2 = fit.LogLinear(5.0, -0.3), fit.LogLinear(4.0, -0.2)
  assert fit.loglinear_crossover(l1, l2) == pytest.approx(1e10)
  assert fit.loglinear_crossover(l1, fit.LogLinear(4.0, -0.3)) is None  # parallel


MM = fit.PowerLaw(1.2, math.log(3.0e2), 0.12)  # steeper, higher at small compute
TP = fit.PowerLaw(1.8, math.log(5.568021064068836), 0.06)  # meets MM at C = 1e21


def _rows(law: fit.PowerLaw, arch: str, noise: float, seed: int):
  rng = np.random.default_rng(seed)
  c = np.geomspace(1e15, 1e19, 7)
  y = law(c) + rng.normal(0, noise, c.size)
  return [{"name": f"{arch}{i}", "arch": arch, "flops": float(ci), "eval_loss": float(yi),
           "peak_lr": 1e-3, "non_embedding_params": 1e6 * (i + 1), "tokens": 2e7 * (i + 1),
           "d_model": 64 * (i + 1), "n_layers": 2} for i, (ci, yi) in enumerate(zip(c, y))]


def test_analyze_finds_a_crossover_with_an_interval_and_reports_none_when_absent():
  """Data on 1e15..1e19 (7 points per arch, noise sd 0.003); the true laws cross at 1e21,
  two decades beyond the data. The 95% interval must contain 1e21 and the laws' exponents.
  (The straight lines in log C cross far earlier, ~3e19: curvature matters.)"""
  mm, tp = MM, TP
  want = fit.crossover(mm, tp, 1e15, fit.C_MAX)
  assert want == pytest.approx(1e21, rel=1e-6)
  rows = _rows(mm, "mmfree", 0.003, 0) + _rows(tp, "transformer", 0.003, 10)
  res = fit.analyze(rows, n_boot=100)
  pl = res["crossover"]["power_law"]
  assert pl["ci"][0] < want < pl["ci"][1], (pl, want)
  assert pl["C"] == pytest.approx(want, rel=0.3)
  assert pl["frac_crossing"] > 0.5 and "crossover at" in pl["status"]
  assert "transformer lower before, mmfree lower after" in pl["status"]
  for arch, law in (("mmfree", mm), ("transformer", tp)):
    lo, hi = res["archs"][arch]["power_law_ci"]["alpha"]
    assert lo < law.alpha < hi
  # Transformer++ 0.5 lower everywhere (same law shifted): no crossover, robustly.
  rows = _rows(mm, "mmfree", 0.003, 0) + _rows(fit.PowerLaw(0.7, math.log(3.0e2), 0.12),
                                               "transformer", 0.003, 1)
  res = fit.analyze(rows, n_boot=50)
  for kind in ("power_law", "loglinear"):
    c = res["crossover"][kind]
    assert c["C"] is None and c["status"].startswith("no crossover"), c
    assert c["paired"] and c["frac_crossing"] < 0.05 and c["ci"][1] == math.inf
  # LR-axis rows (another LR at a size that is already there) stay out of the fit.
  extra = dict(rows[0], name="lr", peak_lr=1e-2, eval_loss=9.0)
  pts = fit.scaling_points(rows + [extra])
  assert all(r["name"] != "lr" for r in pts["mmfree"])
  assert list(fit.lr_axis(rows + [extra]).values())[0][-1]["name"] == "lr"


def test_figures_and_report_files(tmp_path):
  rows = _rows(MM, "mmfree", 0.003, 0) + _rows(TP, "transformer", 0.003, 10)
  rows += [dict(rows[0], name="lr1", peak_lr=3e-3, eval_loss=rows[0]["eval_loss"] + 0.1)]
  res = fit.analyze(rows, n_boot=20)
  files = plots.save(plots.plot_scaling(res, paper=True), str(tmp_path / "s"))
  files += plots.save(plots.plot_lr_sensitivity(rows), str(tmp_path / "lr"))
  files += plots.save(plots.plot_lr_schedules(200), str(tmp_path / "sched"))
  for f in files:
    assert os.path.getsize(f) > 1000
  md = report.markdown(res, [dict(r, d_model=1, n_layers=1, tokens_per_param=1.0, final_loss=2.0)
                             for r in rows], "synthetic")
  assert "| mmfree | 7 |" in md and "crossover at" in md
  js = json.dumps(report.to_json(res))  # strict JSON (no Infinity)
  assert "Infinity" not in js and "NaN" not in js


def test_report_cli_errors(tmp_path):
  out = subprocess.run([sys.executable, "-m", "mmfree_jax.scaling.report", f"--workdir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2
  err = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("error: no results table at")


def test_paper_points_use_six_n_d():
  pts = {p["name"]: p for p in res_lib.paper_points()}
  assert len(pts) == 4  # 1.3B: no published number in SPEC, left out
  p = pts["paper mmfree 370M"]
  assert p["flops_params"] == 374_108_160 - 32000 * 1024
  assert p["flops"] == pytest.approx(6 * 341_340_160 * 15e9)
  assert pts["paper transformer 2.7B"]["flops"] == pytest.approx(
      6 * flops.flops_params(preset("2.7B", "transformer")) * 100e9)


def test_planning_model():
  cfg = ModelConfig(d_model=512, n_layers=4)
  assert flops.planned_mfu(cfg) == pytest.approx(0.15)
  assert flops.planned_mfu(preset("1.3B", "transformer")) == pytest.approx(0.45)
  s = flops.estimate_train_seconds(cfg, 512, 1e8, overhead_s=0)
  assert s == pytest.approx(flops.train_flops(cfg, 512, 1e8) / (0.15 * 989e12))


def test_python_sources_corpus(tmp_path):
  src = tmp_path / "src"
  (src / "pkg").mkdir(parents=True)
  body = "def f(x):\n  return x + 1\n" * 20
  (src / "pkg" / "a.py").write_text(body)
  (src / "pkg" / "b.py").write_text(body)  # duplicate of a.py: kept once
  (src / "pkg" / "c.py").write_text("x = 1\n")  # too short
  (src / "pkg" / "d.py").write_text(body.replace("1", "2"))
  (src / "pkg" / "e.txt").write_text(body)  # not python
  out = tmp_path / "c.jsonl"
  s = corpus.python_sources(str(out), [str(src)], min_chars=100)
  assert s == {"files": 4, "duplicates": 1, "skipped_size": 1, "unreadable": 0,
               "documents": 2, "bytes": 2 * len(body)}
  docs = [json.loads(l) for l in out.read_text().splitlines()]
  assert sorted(d["text"] for d in docs) == sorted([body, body.replace("1", "2")])
  s = corpus.python_sources(str(out), [str(src)], min_chars=100, max_bytes=len(body))
  assert s["documents"] == 1
  with pytest.raises(ValueError, match="not a directory"):
    corpus.python_sources(str(out), [str(tmp_path / "nope")])
