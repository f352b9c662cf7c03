"""Sweep grids and the runner: the micro sweep end to end, kill + resume, commands, errors."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from experiments import sweeps
from mmfree_jax import sweep
from mmfree_jax.models import param_counts
from mmfree_jax.scaling import flops as flops_lib
from mmfree_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_FILE = os.path.join(ROOT, "experiments", "sweeps.py")
MICRO = ["mmfree-d16-L2", "mmfree-d32-L2", "mmfree-d64-L2",
         "transformer-d16-L2", "transformer-d32-L2", "transformer-d64-L2"]
CHILD_ENV = {"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # one CPU device per point


def shared_dirs(tmp_path_factory):
  """(micro workdir, data dir, XLA cache) shared by every test module of the session."""
  base = tmp_path_factory.getbasetemp()
  data = os.environ.get("MMFREE_TEST_DATA_DIR") or str(base / "sweep_data")
  return str(base / "micro_sweep"), data, str(base / "jax_cache")


@pytest.fixture(scope="session")
def micro_dir(tmp_path_factory):
  """The micro sweep, run once per session (a second call only finds it finished)."""
  wd, data, cache = shared_dirs(tmp_path_factory)
  sweep.run_sweep(f"{SWEEP_FILE}:micro", wd, sets={"data.data_dir": data}, progress=False,
                  env={**CHILD_ENV, "JAX_COMPILATION_CACHE_DIR": cache})
  return wd


def _flat(c):
  return sweeps._flat(c)  # noqa: SLF001


@pytest.mark.parametrize("name", sweeps.SWEEPS)
def test_overrides_rebuild_every_point(name):
  sw = sweep.load_sweep(f"{SWEEP_FILE}:{name}")
  names = [n for n, _ in sw.points]
  assert len(names) == len(set(names)) and names
  for n in names:
    assert _flat(sweep.point_config(sw, n)) == _flat(sweeps.get_config(f"{name}/{n}")), n


def test_paper_grid_matches_spec():
  want = {"370M": (374_108_160, 4e-3, 15e9), "1.3B": (1_364_779_008, 2.5e-3, 100e9),
          "2.7B": (2_702_357_504, 1.5e-3, 100e9)}
  pts = dict(sweeps.points("paper"))
  assert len(pts) == 6
  for size, (params, lr, tokens) in want.items():
    for arch in ("mmfree", "transformer"):
      c = pts[f"{arch}-{size}"]
      cfg = loop.model_config(c)
      assert cfg.arch == arch and c.data.seq_len == 2048
      tok = c.train.steps * c.train.batch_size * c.data.seq_len
      assert abs(tok - tokens) / tokens < 1e-4  # whole steps of 256 x 2048 tokens
      if arch == "mmfree":
        assert param_counts(cfg)["total"] == params
        assert c.optim.peak_lr == lr and c.optim.schedule == "mmfree"
      else:
        assert c.optim.peak_lr == 3e-4 and c.optim.schedule == "cosine"
        assert c.optim.min_lr_ratio == 0.1


def test_mini_is_an_nd_grid_of_short_runs():
  sw = sweep.load_sweep(f"{SWEEP_FILE}:mini")
  rows = sweep.plan(sw, [n for n, _ in sw.points], corpus_tokens=1e8)
  assert len(rows) == 2 * 6 * 3
  for arch in ("mmfree", "transformer"):
    for tpp in (10, 20, 40):
      ne = sorted(r["non_embedding_params"] for r in rows
                  if r["name"].startswith(f"{arch}-") and r["name"].endswith(f"-tpp{tpp}"))
      assert len(ne) == 6 and ne[-1] / ne[0] >= 30
  for r in rows:
    assert abs(r["tokens_per_param"] - int(r["name"].rsplit("tpp", 1)[1])) < 0.1
  assert all(r["planned_s"] <= 600 for r in rows)
  # The plan's time model: FLOPs / (MFU(d) * 989 TFLOP/s) + overhead.
  c = sweep.point_config(sw, "mmfree-d320-L5-tpp20")
  cfg = loop.model_config(c)
  r = [r for r in rows if r["name"] == "mmfree-d320-L5-tpp20"][0]
  want = r["flops"] / (0.30 * 320 / 1024 * 989e12) + flops_lib.PLAN_RUN_OVERHEAD_S
  assert r["planned_s"] == pytest.approx(want, rel=1e-9)
  assert r["flops"] == flops_lib.train_flops(cfg, 512, r["tokens"])
  assert r["epochs"] == pytest.approx(r["tokens"] / 1e8)
  # The LR axis shares its x1 points with the grid.
  lr = dict(sweep.load_sweep(f"{SWEEP_FILE}:mini_lr").points)
  assert {"mmfree-d128-L3-tpp20", "transformer-d128-L3-tpp20"} <= set(lr) & set(dict(sw.points))


def test_micro_grid_sizes():
  for arch in ("mmfree", "transformer"):
    cfgs = [loop.model_config(sweeps.get_config(f"micro/{arch}-d{d}-L2"))
            for d in sweeps.MICRO_SIZES]
    ne = [param_counts(c)["non_embedding"] for c in cfgs]
    assert ne == sorted(ne) and ne[-1] / ne[0] > 4.5


def test_printed_commands_parse_to_the_point_configs(tmp_path):
  out = subprocess.run([sys.executable, "-m", "mmfree_jax.sweep", "--workdir=runs/m",
                        "--sweep=experiments/sweeps.py:micro", "--print_commands",
                        "--set=data.data_dir=/x y"], cwd=ROOT, capture_output=True, text=True,
                       check=True)
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 6
  for line, name in zip(lines, MICRO):
    argv = shlex.split(line)
    assert argv[:4] == ["python", "-m", "mmfree_jax.train", "--config=experiments/sweeps.py:micro"]
    assert argv[-1] == f"--workdir=runs/m/{name}"
    fv = flags.FlagValues()
    cli = ["prog", *argv[3:-1]]
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=cli)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
      fv(cli)
    finally:
      os.chdir(cwd)
    want = sweeps.get_config(f"micro/{name}")
    want.data.data_dir = "/x y"
    assert _flat(fv.config) == _flat(want), name


@pytest.mark.parametrize("args,match", [
    (["--sweep=experiments/sweeps.py"], "must look like"),
    (["--sweep=nope.py:micro"], "does not exist"),
    (["--sweep=experiments/sweeps.py:huge"], "unknown sweep 'huge'"),
    (["--sweep=experiments/sweeps.py:micro", "--points=gpt*"], "matches no point"),
    (["--sweep=experiments/sweeps.py:micro", "--set=train.stepz=3"], "no key 'train.stepz'"),
    (["--sweep=experiments/sweeps.py:micro", "--set=steps"], "section.key=value"),
    (["--sweep=experiments/sweeps.py:micro", "--set=train.steps=abc"], "wrong type"),
    (["--sweep=experiments/sweeps.py:micro"], "--workdir is required"),
])
def test_bad_input_is_one_line_and_exit_2(args, match):
  out = subprocess.run([sys.executable, "-m", "mmfree_jax.sweep", *args], cwd=ROOT,
                       capture_output=True, text=True)
  assert out.returncode == 2, out
  err = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("error:") and match in err[0], out.stderr


def test_micro_results_table(micro_dir):
  rows = {r["name"]: r for r in sweep.collect(micro_dir)}
  assert sorted(rows) == sorted(MICRO)
  with open(os.path.join(micro_dir, "results.csv")) as f:
    assert f.readline().strip().split(",") == list(sweep.COLUMNS)
  tokens = 32 * 8 * 64
  for name, r in rows.items():
    cfg = loop.model_config(sweeps.get_config(f"micro/{name}"))
    assert r["tokens"] == tokens and r["steps"] == 32 and r["runs"] == 1
    assert r["non_embedding_params"] == param_counts(cfg)["non_embedding"]
    assert r["flops"] == pytest.approx(flops_lib.train_flops(cfg, 64, tokens), rel=1e-12)
    assert r["tokens_per_param"] == pytest.approx(tokens / r["non_embedding_params"])
    # Shakespeare's train split holds ~1.58M tokens: 16k tokens is ~1% of an epoch.
    assert 0.009 < r["epochs"] < 0.012
    assert r["wall_s"] > 0 and np.isfinite(r["eval_loss"]) and np.isfinite(r["final_loss"])
  for arch in ("mmfree", "transformer"):  # wider is better, even after 32 steps
    ev = [rows[f"{arch}-d{d}-L2"]["eval_loss"] for d in (16, 32, 64)]
    assert ev[0] > ev[1] > ev[2], (arch, ev)
    assert ev[2] < 7.2  # from ln(32000) = 10.37 at init (unigram entropy ~6.4)


def test_report_on_micro(micro_dir, tmp_path):
  out = subprocess.run([sys.executable, "-m", "mmfree_jax.scaling.report", f"--workdir={micro_dir}",
                        f"--out={tmp_path}", "--paper", "--n_boot=50"], cwd=ROOT,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  for f in ("scaling.png", "scaling.pdf", "loss_curves.png", "loss_curves.pdf", "report.md"):
    assert os.path.getsize(tmp_path / f) > 1000, f
  fit = json.load(open(tmp_path / "fit.json"))
  for arch in ("mmfree", "transformer"):
    assert fit["archs"][arch]["n"] == 3
    assert fit["archs"][arch]["loglinear"]["slope_per_decade"] < 0
  md = (tmp_path / "report.md").read_text()
  assert "per decade" in md and "Crossover" in md and "read off its Fig. 3" in md


def _wait(pred, proc, timeout=240):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if pred():
      return
    if proc.poll() is not None:
      raise AssertionError(f"runner exited early: {proc.communicate()}")
    time.sleep(0.2)
  raise AssertionError("timed out")


def test_killed_sweep_resumes_without_redoing_points(micro_dir, tmp_path_factory, tmp_path):
  """SIGKILL the runner (and its point) once point 1 is done and point 2 has checkpointed;
  the rerun skips point 1 and resumes point 2, which ends as if never interrupted."""
  _, data, cache = shared_dirs(tmp_path_factory)
  wd = tmp_path / "sweep"
  first, second = "mmfree-d16-L2", "transformer-d16-L2"  # in sweep order
  args = [sys.executable, "-m", "mmfree_jax.sweep", "--sweep=experiments/sweeps.py:micro",
          f"--workdir={wd}", f"--points={first},{second}", f"--set=data.data_dir={data}"]
  env = {**os.environ, **CHILD_ENV, "JAX_COMPILATION_CACHE_DIR": cache}
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, start_new_session=True)
  try:
    _wait(lambda: (wd / first / "summary.json").exists()
          and (wd / second / "checkpoints" / "16").is_dir(), proc)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  assert not (wd / second / "summary.json").exists()
  done_mtime = os.path.getmtime(wd / first / "summary.json")
  out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
  text = out.stdout + out.stderr
  assert out.returncode == 0, text
  assert f"{first}: finished, skipped" in text
  # A log, not a terminal: no redraw spam, no library chatter, one ETA (the bar's).
  assert len(text) < 4000 and "Using custom data configuration" not in text, text
  assert "eta" not in text and "2/2 points" in text, text
  assert os.path.getmtime(wd / first / "summary.json") == done_mtime
  rec1 = json.load(open(wd / first / sweep.POINT_FILE))
  rec2 = json.load(open(wd / second / sweep.POINT_FILE))
  assert rec1["runs"] == 1 and rec2["runs"] == 1  # the killed attempt never got recorded
  log = (wd / second / "train.log").read_text()
  assert log.count("\n$ ") == 2 and "resumed from checkpoint step 16" in log
  assert len(log) < 8000, log
  rows = {r["name"]: r for r in sweep.collect(str(wd))}
  assert sorted(rows) == sorted([first, second])
  ref = {r["name"]: r for r in sweep.collect(micro_dir)}
  for n in (first, second):  # bitwise on CPU: same data order, same math
    assert rows[n]["eval_loss"] == ref[n]["eval_loss"], n
    assert rows[n]["final_loss"] == ref[n]["final_loss"], n
