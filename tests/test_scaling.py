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
  boots = [b for b in fit.bootstrap(fit.fit_power_law, C, y, n_boot=200) if b is not None]
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


def test_compute_optimal_allocation_minimises_loss_at_fixed_compute():
  """N_opt from the closed form against a brute-force search along C = 6ND; N_opt ∝ C^a with
  a = beta / (alpha + beta); no optimum when a term is dropped."""
  law = fit.NDLaw(1.69, math.log(406.4), 0.34, math.log(410.7), 0.28)
  for c in (1e18, 1e21, 1e24):
    n = np.geomspace(1e4, 1e13, 200_001)
    brute = n[np.argmin(law(n, c / (6 * n)))]
    assert float(law.optimal_n(c)) == pytest.approx(brute, rel=1e-3)
    assert float(law.optimal_loss(c)) == pytest.approx(float(np.min(law(n, c / (6 * n)))),
                                                       abs=1e-9)
  assert law.n_opt_exponent == pytest.approx(0.28 / 0.62)
  ratio = float(law.optimal_n(1e23) / law.optimal_n(1e20))
  assert math.log10(ratio) / 3 == pytest.approx(law.n_opt_exponent, rel=1e-9)
  flat = fit.NDLaw(1.69, math.log(406.4), 0.34, -math.inf, 0.28)  # B = 0: D does not matter
  assert not flat.has_optimum and math.isnan(flat.n_opt_exponent)
  assert math.isnan(float(flat.optimal_n(1e20)))
  with pytest.raises(ValueError, match="no compute-optimal"):
    fit.kind_crossover("nd", flat, law, 1e15)


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
  # Compute-optimal curves of two L(N, D) laws with the same exponents and A/B: the same
  # N_opt, and a loss term k * F(C) with F(C) = (1 + alpha/beta) A N_opt^-alpha.
  n1 = fit.NDLaw(1.5, math.log(400.0), 0.3, math.log(800.0), 0.3)
  n2 = fit.NDLaw(1.8, math.log(200.0), 0.3, math.log(400.0), 0.3)
  x = (1.8 - 1.5) / (400.0 - 200.0)  # where (A1 - A2) N_opt^-alpha (1 + alpha/beta) = E2 - E1
  n_opt = (x / 2) ** (-1 / 0.3)
  want = 6 * (n_opt * 2 ** (1 / 0.6)) ** 2  # N_opt = (A / B)^(1/0.6) (C/6)^0.5, A / B = 1/2
  assert fit.kind_crossover("nd", n1, n2, 1e10) == pytest.approx(want, rel=1e-6)


SIZES = ((64, 2), (96, 3), (128, 3), (192, 4), (256, 4), (320, 5))  # experiments/sweeps.py:mini
TPP = (10, 20, 40)
MM_ND = fit.NDLaw(1.9, math.log(40.0), 0.30, math.log(150.0), 0.34)
TP_ND = fit.NDLaw(1.7, math.log(30.0), 0.28, math.log(120.0), 0.30)
LR = {"mmfree": 4e-3, "transformer": 1e-3}


def _row(arch: str, name: str, n: int, tokens: float, loss: float, lr: float, d=64, layers=2):
  from mmfree_jax.sweep import COLUMNS  # noqa: PLC0415
  r = {"name": name, "arch": arch, "d_model": d, "n_layers": layers, "d_ff": 3 * d,
       "seq_len": 512, "batch_size": 32, "steps": int(tokens // 16384), "peak_lr": lr,
       "schedule": "mmfree" if arch == "mmfree" else "cosine", "params": n + 64_000 * d,
       "non_embedding_params": n, "flops_params": n + 32_000 * d, "tokens": tokens,
       "flops": 6.0 * (n + 32_000 * d) * tokens, "tokens_per_param": tokens / n,
       "epochs": tokens / 1e9, "final_loss": loss + 0.05, "eval_loss": loss,
       "unigram_xent_validation": 7.0, "wall_s": 1.0, "runs": 1}
  assert set(r) == set(COLUMNS)
  return r


def _grid(law: fit.NDLaw, arch: str, noise: float, seed: int, lr_factors=()) -> list[dict]:
  """The mini sweep's L(N, D) grid (6 sizes x 10/20/40 tokens per parameter) from a known
  law plus Gaussian noise; LR-axis rows (another LR at d=128, 20 tokens/param) 0.5 higher."""
  rng = np.random.default_rng(seed)
  rows = []
  for d, layers in SIZES:
    n = 12 * layers * d * d
    for tpp in TPP:
      y = float(law(n, tpp * n) + rng.normal(0, noise))
      rows.append(_row(arch, f"{arch}-d{d}-L{layers}-tpp{tpp}", n, float(tpp * n), y, LR[arch],
                       d, layers))
      if (d, tpp) == (128, 20):
        rows += [_row(arch, f"{arch}-d{d}-L{layers}-tpp{tpp}-lrx{f:g}", n, float(tpp * n),
                      y + 0.5, LR[arch] * f, d, layers) for f in lr_factors]
  return rows


def _write(workdir, rows):
  import csv  # noqa: PLC0415
  from mmfree_jax.sweep import COLUMNS  # noqa: PLC0415
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)


LR_FACTORS = (0.25, 0.5, 2.0, 4.0)


@pytest.fixture(scope="module")
def grid_rows():
  """Both arches on the mini grid (noise sd 0.005) with an LR axis."""
  return (_grid(MM_ND, "mmfree", 0.005, 0, LR_FACTORS)
          + _grid(TP_ND, "transformer", 0.005, 100, LR_FACTORS))


@pytest.fixture(scope="module")
def grid_analysis(grid_rows):
  return fit.analyze(grid_rows, n_boot=50)


def test_nd_fit_on_the_grid_recovers_the_law_with_intervals(grid_analysis):
  """18 noisy points per arch (N 7x over 6 sizes... 62x; D 4x per size): the 95% intervals of
  alpha, beta, E and the N_opt exponent contain the true values; estimates are close; the
  exponent is beta/(alpha+beta) of the fit; N_opt at the largest C is near the true one."""
  for arch, law in (("mmfree", MM_ND), ("transformer", TP_ND)):
    a = grid_analysis["archs"][arch]
    f = a["fits"]["nd"]
    assert a["n"] == 18 and not f.unconstrained and not a["skipped"]
    for k, tol in (("alpha", 0.03), ("beta", 0.03), ("E", 0.05)):
      lo, hi = f.ci[k]
      assert lo < getattr(law, k) < hi, (arch, k, f.ci[k], getattr(law, k))
      assert getattr(f.law, k) == pytest.approx(getattr(law, k), abs=tol)
    assert f.law.n_opt_exponent == pytest.approx(f.law.beta / (f.law.alpha + f.law.beta))
    lo, hi = f.ci["n_opt_exponent"]
    assert lo < law.beta / (law.alpha + law.beta) < hi
    opt = a["optimal"]
    assert opt["N_ci"][0] < float(law.optimal_n(opt["C"])) < opt["N_ci"][1]
    assert opt["tokens_per_param"] == pytest.approx(opt["C"] / 6 / opt["N"] ** 2)


def test_gap_between_the_arches_follows_the_laws(grid_analysis):
  """The L(N, D) gap on the 3 x 3 reference grid (noise sd 0.005 per point): within 0.03 of
  the true laws' gap at the corners, 0.005 at the centre, where the 95% band is narrow and
  holds the estimate; the E gap interval contains the true one."""
  g = grid_analysis["gap"]
  n, d = np.array(g["N"])[:, None], np.array(g["D"])[None, :]
  true = MM_ND(n, d) - TP_ND(n, d)
  gap, lo, hi = (np.array(g[k]) for k in ("gap", "lo", "hi"))
  assert np.abs(gap - true).max() < 0.03 and abs(gap[1, 1] - true[1, 1]) < 0.005
  assert np.all(lo <= gap) and np.all(gap <= hi) and hi[1, 1] - lo[1, 1] < 0.02
  assert g["paired"] and g["E_gap_ci"][0] < MM_ND.E - TP_ND.E < g["E_gap_ci"][1]
  assert min(g["N"]) == min(grid_analysis["archs"]["transformer"]["N"])


def test_lr_axis_rows_are_left_out_of_the_law_fits(grid_rows, grid_analysis):
  """The LR-axis rows (0.5 worse) change no fit: the same laws as without them."""
  for arch in ("mmfree", "transformer"):
    a = grid_analysis["archs"][arch]
    assert not any("lrx" in n for n in a["names"])
  plain = fit.analyze([r for r in grid_rows if "lrx" not in r["name"]], n_boot=2)
  for arch, a in plain["archs"].items():
    for kind, f in a["fits"].items():
      assert f.law == grid_analysis["archs"][arch]["fits"][kind].law, (arch, kind)
  groups = fit.lr_axis(grid_rows)
  assert sorted(k[0] for k in groups) == ["mmfree", "transformer"]
  assert all(len(rs) == 1 + len(LR_FACTORS) for rs in groups.values())


MM = fit.PowerLaw(1.2, math.log(3.0e2), 0.12)  # steeper, higher at small compute
TP = fit.PowerLaw(1.8, math.log(5.568021064068836), 0.06)  # meets MM at C = 1e21


def _rows(law: fit.PowerLaw, arch: str, noise: float, seed: int):
  """7 points on one line in (N, D) (one token budget per size: no L(N, D))."""
  rng = np.random.default_rng(seed)
  c = np.geomspace(1e15, 1e19, 7)
  y = law(c) + rng.normal(0, noise, c.size)
  return [dict(_row(arch, f"{arch}{i}", int(1e6 * (i + 1)), 2e7 * (i + 1), float(yi), 1e-3,
                    64 * (i + 1)), flops=float(ci)) for i, (ci, yi) in enumerate(zip(c, y))]


def test_analyze_finds_a_crossover_with_an_interval_and_reports_none_when_absent():
  """Data on 1e15..1e19 (7 points per arch, noise sd 0.003); the true laws cross at 1e21,
  two decades beyond the data. The 95% interval must contain 1e21 and the laws' exponents.
  (The straight lines in log C cross far earlier, ~3e19: curvature matters.)"""
  want = fit.crossover(MM, TP, 1e15, fit.C_MAX)
  assert want == pytest.approx(1e21, rel=1e-6)
  rows = _rows(MM, "mmfree", 0.003, 0) + _rows(TP, "transformer", 0.003, 10)
  res = fit.analyze(rows, n_boot=100)
  pl = res["crossover"]["power_law"]
  assert pl["ci"][0] < want < pl["ci"][1], (pl, want)
  assert pl["C"] == pytest.approx(want, rel=0.3)
  assert pl["frac_crossing"] > 0.5 and "crossover at" in pl["status"]
  assert "transformer lower before, mmfree lower after" in pl["status"]
  for arch, law in (("mmfree", MM), ("transformer", TP)):
    lo, hi = res["archs"][arch]["fits"]["power_law"].ci["alpha"]
    assert lo < law.alpha < hi
    assert "vary independently" in res["archs"][arch]["skipped"]["nd"]
  assert "vary independently" in res["crossover"]["nd"]["skipped"]
  assert "vary independently" in res["gap"]["skipped"]
  # Transformer++ 0.5 lower everywhere (same law shifted): no crossover, robustly.
  rows = _rows(MM, "mmfree", 0.003, 0) + _rows(fit.PowerLaw(0.7, math.log(3.0e2), 0.12),
                                               "transformer", 0.003, 1)
  res = fit.analyze(rows, n_boot=50)
  for kind in ("power_law", "loglinear"):
    c = res["crossover"][kind]
    assert c["C"] is None and c["status"].startswith("no crossover"), c
    assert c["paired"] and c["frac_crossing"] < 0.05 and c["ci"][1] == math.inf


def test_too_few_points_skip_fits_with_the_reason():
  """2 points per arch: the line is exact, the power law and L(N, D) are skipped; the report
  and the figures say so and do not fail."""
  rows = _rows(MM, "mmfree", 0.0, 0)[:2] + _rows(TP, "transformer", 0.0, 0)[:2]
  res = fit.analyze(rows, n_boot=5)
  a = res["archs"]["mmfree"]
  assert "exact interpolation" in a["fits"]["loglinear"].unconstrained
  assert "at least 3 distinct" in a["skipped"]["power_law"]
  assert "power_law" in res["crossover"] and "skipped" in res["crossover"]["power_law"]
  for fig in (plots.plot_scaling(res, paper=True), plots.plot_nd(res), plots.plot_gap(res)):
    fig.canvas.draw()
  plots.plt.close("all")
  md = report.markdown(report.to_json(res), rows, "tiny")
  assert "mmfree: L(C) power law skipped: needs at least 3 distinct x values, got 2" in md
  assert "L(N, D) skipped: N and D must vary independently" in md


def _texts(ax) -> list[str]:
  return [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []


def test_figures_label_every_axis_and_mark_unconstrained_fits(grid_rows, grid_analysis,
                                                               tmp_path):
  """Every panel of every figure has x and y labels and a title; a panel with labelled lines
  has a legend listing all of them; an unconstrained fit is drawn faint and says so."""
  _write(tmp_path, grid_rows)
  figs = [plots.plot_scaling(grid_analysis), plots.plot_scaling(grid_analysis, paper=True),
          plots.plot_nd(grid_analysis), plots.plot_gap(grid_analysis),
          plots.plot_loss_curves(str(tmp_path)), plots.plot_lr_sensitivity(grid_rows),
          plots.plot_lr_schedules(200)]
  assert len(figs[1].axes) == 3  # ours, the paper's points, the slopes
  for fig in figs:
    for ax in fig.axes:
      assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), fig
      labels = [l for l in ax.get_legend_handles_labels()[1] if not l.startswith("_")]
      assert _texts(ax) == labels, (ax.get_title(), labels)
  lr_ax = figs[5].axes[0]
  assert [t.get_text() for t in lr_ax.get_xticklabels()] == [
      "0.00025", "0.0005", "0.001", "0.002", "0.004", "0.008", "0.016"]
  assert {"MatMul-free: grid LR 0.004", "Transformer++: grid LR 0.001"} <= set(_texts(lr_ax))
  assert len(figs[2].axes) == 2 and len(figs[2].axes[0].collections) == len(SIZES)
  # 3 points per arch: the power law interpolates exactly -> faint, labelled unconstrained.
  tiny = fit.analyze(_rows(MM, "mmfree", 0.0, 0)[:3] + _rows(TP, "transformer", 0.0, 0)[:3],
                     n_boot=5)
  ax = plots.plot_scaling(tiny).axes[0]
  faint = [l for l in ax.get_lines() if "(unconstrained)" in l.get_label()]
  assert len(faint) == 2 and all(l.get_alpha() == plots.FAINT for l in faint)
  plots.plt.close("all")


@pytest.fixture(scope="module")
def reported(grid_rows, tmp_path_factory):
  """The report CLI run in-process on the grid's results.csv, written into its directory."""
  wd = tmp_path_factory.mktemp("reported")
  _write(wd, grid_rows)
  assert report.main([f"--workdir={wd}", "--paper", "--n_boot=8"]) == 0
  return wd


def test_report_reproduces_its_outputs_byte_for_byte(reported, tmp_path):
  """A second run on the same results.csv, into another directory: identical report.md,
  fit.json and PNGs. In the results directory PNG only, elsewhere PDFs too."""
  report.run(str(reported), paper=True, n_boot=8, out=str(tmp_path))
  first, second = set(os.listdir(reported)), set(os.listdir(tmp_path))
  pngs = {"scaling.png", "nd.png", "gap.png", "loss_curves.png", "lr_sensitivity.png"}
  assert pngs | {"report.md", "fit.json"} <= first
  assert not any(n.endswith(".pdf") for n in first) and "scaling.pdf" in second
  for n in pngs | {"report.md", "fit.json"}:
    assert (reported / n).read_bytes() == (tmp_path / n).read_bytes(), n
  js = (reported / "fit.json").read_text()
  assert "Infinity" not in js and "NaN" not in js  # strict JSON


def test_report_cli_findings_table_and_errors(reported, tmp_path, capsys):
  """--readme_table prints report.md's findings table from fit.json; bad input: one line."""
  capsys.readouterr()
  assert report.main([f"--workdir={reported}", "--readme_table"]) == 0
  table = capsys.readouterr().out.strip()
  assert table and table in (reported / "report.md").read_text()
  js = json.loads((reported / "fit.json").read_text())
  slope = js["archs"]["mmfree"]["loglinear"]["slope_per_decade"]
  assert f"| L(C) slope, loss per decade of C | {slope:+.3f} [" in table
  assert report.main([f"--workdir={tmp_path}", "--readme_table"]) == 2
  assert "fit.json; run the report without --readme_table first" in capsys.readouterr().err
  out = subprocess.run([sys.executable, "-m", "mmfree_jax.scaling.report",
                        f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2
  err = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("error: no results table at")


FINDINGS = ("<!-- findings:begin -->", "<!-- findings:end -->")
NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?%?|∞"


def test_results_readme_findings_are_the_committed_fit_json():
  """Every number of results/README.md's findings table is the one the committed study's
  fit.json gives (rendered by `report --readme_table`)."""
  import re  # noqa: PLC0415
  path = os.path.join(ROOT, res_lib.STUDY, "fit.json")
  if not os.path.isfile(path):
    pytest.skip(f"no committed study yet ({res_lib.STUDY}/fit.json)")
  with open(path) as f:
    want = report.findings_table(json.load(f))
  with open(os.path.join(ROOT, "results", "README.md")) as f:
    text = f.read()
  assert FINDINGS[0] in text and FINDINGS[1] in text, "results/README.md: findings markers"
  got = text.split(FINDINGS[0], 1)[1].split(FINDINGS[1], 1)[0]
  assert re.findall(NUMBER, got) == re.findall(NUMBER, want)


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


def test_read_metrics_skips_a_torn_line_and_keeps_a_resumed_runs_last_rows(tmp_path, caplog):
  rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.6},
          {"step": 2, "loss": 2.4}]
  text = "".join(json.dumps(r) + "\n" for r in rows[:2]) + '{"step": 3, "lo\n'
  (tmp_path / "metrics.jsonl").write_text(text + "".join(json.dumps(r) + "\n" for r in rows[2:]))
  got = res_lib.read_metrics(str(tmp_path))
  assert got == [rows[0], rows[2], rows[3]]
  assert "skipped 1 undecodable line(s), the first at line 3" in caplog.text
