"""The trainer: mesh equivalence, exact resume, checkpoints across meshes, signals, errors."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from experiments import tiny
from mmfree_jax.config import ConfigError
from mmfree_jax.models import init_params
from mmfree_jax.train import checkpoint as ckpt
from mmfree_jax.train import loop
from mmfree_jax.train import optim
from mmfree_jax.train import setup
from mmfree_jax.train.metrics import MetricWriter, final_report, read_jsonl, tag
from mmfree_jax.train.optim import lr_schedule, make_optimizer
from mmfree_jax.train.step import TrainState, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def small_config(data_dir, steps=10, **train):
  c = tiny.get_config()
  c.model.preset, c.model.d_model, c.model.n_layers = "micro", 32, 2
  c.data.seq_len, c.data.data_dir = 32, data_dir
  c.train.update(batch_size=8, steps=steps, log_every=1, eval_every=0, checkpoint_every=0,
                 eval_batches=2, sample_tokens=0)
  c.train.update(train)
  return c


def losses(workdir):
  return [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def test_meshes_give_the_same_training(data_dir, tmp_path):
  """10 steps on (1,1,1), (8,1,1), (2,4,1), (2,2,2).

  Tolerance: the first loss (same init, no update yet) agrees to 1e-6 relative; after
  10 steps losses agree to 5e-4 relative and the parameter difference is < 5% of the
  distance the parameters moved. Sharding changes reduction order; ternary/int8
  rounding and Adam's first steps (~lr * sign(g)) amplify those last-bit differences.
  """
  runs = {}
  for mesh in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]:
    c = small_config(data_dir)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    wd = str(tmp_path / "x".join(map(str, mesh)))
    out = loop.run(c, wd, devices=jax.devices()[: int(np.prod(mesh))])
    runs[mesh] = (np.array([r["loss"] for r in losses(wd)]), jax.device_get(out["state"].params))
  base_l, base_p = runs[(1, 1, 1)]
  p0 = jax.device_get(nn.unbox(init_params(setup.model_config(small_config(data_dir)), jax.random.key(0))))
  moved = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(base_p), jax.tree.leaves(p0))))
  for mesh, (l, p) in runs.items():
    assert len(l) == 10
    np.testing.assert_allclose(l[0], base_l[0], rtol=1e-6)
    np.testing.assert_allclose(l, base_l, rtol=5e-4)
    diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(base_p))))
    assert diff < 0.05 * moved, (mesh, diff, moved)


def _cli(workdir, data_dir, steps, extra=()):
  args = [sys.executable, "-m", "mmfree_jax.train", "--config=experiments/tiny.py", f"--workdir={workdir}",
          "--config.model.preset=micro", "--config.model.d_model=32", "--config.model.n_layers=2",
          "--config.data.seq_len=32", f"--config.data.data_dir={data_dir}",
          "--config.train.batch_size=8", f"--config.train.steps={steps}", "--config.train.log_every=1",
          "--config.train.eval_every=0", "--config.train.eval_batches=2",
          "--config.train.sample_tokens=0", *extra]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return args, env


def _wait_for_step(workdir, step, proc, timeout=120):
  path = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise AssertionError(f"trainer exited early: {proc.communicate()}")
    if os.path.exists(path) and any(r.get("step", 0) >= step for r in losses(workdir)):
      return
    time.sleep(0.2)
  raise AssertionError("timed out waiting for training progress")


def test_sigkill_then_resume_matches_uninterrupted_run(data_dir, tmp_path):
  steps = 16
  ref = str(tmp_path / "ref")
  args, env = _cli(ref, data_dir, steps, ["--config.train.checkpoint_every=4"])
  subprocess.run(args, env=env, cwd=ROOT, check=True, capture_output=True)
  run = str(tmp_path / "killed")
  args, env = _cli(run, data_dir, steps, ["--config.train.checkpoint_every=4"])
  proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  _wait_for_step(run, 10, proc)
  proc.kill()
  proc.wait()
  saved = sorted(int(s) for s in os.listdir(os.path.join(run, "checkpoints")) if s.isdigit())
  assert saved and saved[-1] < steps
  out = subprocess.run(args, env=env, cwd=ROOT, check=True, capture_output=True, text=True)
  assert f"resumed from checkpoint step {saved[-1]}" in out.stdout
  want = {r["step"]: r for r in losses(ref)}
  got = {}
  for r in losses(run):  # the resumed run's rows come last and win
    got[r["step"]] = r
  assert sorted(got) == list(range(1, steps + 1))
  for s in range(saved[-1] + 1, steps + 1):
    assert got[s]["loss"] == want[s]["loss"], s  # bitwise on CPU
    assert got[s]["data_fingerprint"] == want[s]["data_fingerprint"], s  # no repeat, no skip


def test_sigterm_saves_and_exits_zero_and_a_second_trainer_is_refused(data_dir, tmp_path):
  """While a trainer runs, the same command again exits 2 naming the holder (a double launch,
  a requeue while the old job lives) and writes nothing; SIGTERM then saves and exits 0."""
  run = str(tmp_path / "term")
  args, env = _cli(run, data_dir, 200)
  proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  _wait_for_step(run, 3, proc)
  second = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
  err = [l for l in second.stderr.splitlines() if l.startswith("error:")]
  assert second.returncode == 2 and len(err) == 1, second.stderr[-2000:]
  assert f"is in use by another trainer (pid {proc.pid} on host {socket.gethostname()}" in err[0]
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0
  assert "preempted (SIGTERM): checkpoint saved at step" in out
  step = int(out.split("checkpoint saved at step ")[1].split(";")[0])
  assert os.path.isdir(os.path.join(run, "checkpoints", str(step)))
  steps = [r["step"] for r in losses(run)]
  assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved rows
  assert not os.path.exists(os.path.join(run, "train.lock"))


def test_checkpoint_restores_on_other_meshes_and_corrupt_falls_back(data_dir, tmp_path, capsys):
  wd = str(tmp_path / "run")
  c = small_config(data_dir, steps=6, checkpoint_every=3)
  c.mesh.data, c.mesh.fsdp = 2, 4
  saved = jax.device_get(loop.run(c, wd)["state"].params)
  for mesh, n in (((1, 1, 1), 1), ((2, 2, 2), 8)):
    c2 = small_config(data_dir, steps=6)
    c2.mesh.data, c2.mesh.fsdp, c2.mesh.tensor = mesh
    out = loop.run(c2, wd, devices=jax.devices()[:n])  # nothing left to train: restore only
    restored = out["state"].params
    leaf = restored["layers"]["mlp"]["gate_proj"]["kernel"]
    assert len(leaf.sharding.device_set) == n
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
  # Corrupt the newest checkpoint: the trainer warns, moves it aside, resumes from step 3.
  newest = os.path.join(wd, "checkpoints", "6", "state")
  for root, _, files in os.walk(newest):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  capsys.readouterr()
  c3 = small_config(data_dir, steps=6, checkpoint_every=3)
  out = loop.run(c3, wd, devices=jax.devices()[:1])
  text = capsys.readouterr().out
  assert "checkpoint step 6 is unreadable" in text and "resumed from checkpoint step 3" in text
  assert os.path.isdir(os.path.join(wd, "checkpoints_corrupt", "6"))  # kept, not deleted
  assert int(out["state"].step) == 6


def test_resume_with_another_model_is_refused_untouched(data_dir, tmp_path):
  wd = str(tmp_path / "run")
  loop.run(small_config(data_dir, steps=2, checkpoint_every=2), wd, devices=jax.devices()[:1])
  c = small_config(data_dir, steps=4)
  c.model.d_model = 64
  with pytest.raises(ConfigError, match="written for a different model"):
    loop.run(c, wd, devices=jax.devices()[:1])
  assert os.listdir(os.path.join(wd, "checkpoints")) == ["2"]
  assert not os.path.exists(os.path.join(wd, "checkpoints_corrupt"))
  with open(os.path.join(wd, "model_config.json")) as f:
    assert json.load(f)["d_model"] == 32  # config files are written only after a restore


def test_nonfinite_loss_aborts_without_checkpoint(data_dir, tmp_path):
  wd = str(tmp_path / "nan")
  c = small_config(data_dir, steps=8, checkpoint_every=1)
  c.optim.peak_lr, c.optim.warmup_steps, c.optim.clip = 1e30, 0, 0.0
  with pytest.raises(loop.TrainingAborted, match="non-finite gradient norm at step 2 \\(loss=10"):
    loop.run(c, wd, devices=jax.devices()[:1])
  mngr = ckpt.make_manager(wd, 10)  # every checkpoint written holds finite params
  for step in mngr.all_steps():
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def test_skip_mode_drops_nonfinite_updates():
  cfg = setup.model_config(small_config(""))
  params = nn.unbox(init_params(cfg, jax.random.key(0)))
  tx = optax.adam(1e-3)
  step = jax.jit(make_train_step(cfg, tx))
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jnp.zeros((), jnp.int32))
  tok = jnp.ones((2, 8), jnp.int32)
  bad = {"inputs": tok, "targets": tok, "segment_ids": tok, "weights": jnp.full((2, 8), jnp.nan)}
  new, m = step(state, bad)
  assert not bool(m["finite"]) and int(new.skipped) == 1 and int(new.step) == 1
  jax.tree.map(np.testing.assert_array_equal, new.params, params)


def test_grad_accumulation_matches_one_big_batch():
  cfg = setup.model_config(small_config(""))
  params = nn.unbox(init_params(cfg, jax.random.key(0)))
  tx = optax.sgd(1.0)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jnp.zeros((), jnp.int32))
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 300, (4, 16)), "targets": rng.integers(0, 300, (4, 16)),
           "segment_ids": np.ones((4, 16), np.int32), "weights": rng.integers(0, 2, (4, 16)).astype(np.float32)}
  one, m1 = jax.jit(make_train_step(cfg, tx, 1))(state, batch)
  two, m2 = jax.jit(make_train_step(cfg, tx, 2))(state, batch)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), one.params, two.params)


def test_schedules():
  s = lr_schedule(1.0, 100, 10, "mmfree")
  assert float(s(0)) == pytest.approx(0.1) and float(s(9)) == pytest.approx(1.0)
  before, after = float(s(49)), float(s(50))
  assert after == pytest.approx(0.5 * before, rel=0.05)  # halved at the midpoint
  assert float(s(99)) < 1e-3
  t = lr_schedule(1.0, 100, 0, "cosine", 0.1)
  assert float(t(0)) == pytest.approx(1.0) and float(t(100)) == pytest.approx(0.1)
  c = small_config("")
  c.optim.wd_off_at_midpoint = True
  tx, _ = make_optimizer(c, 10)
  p = {"kernel": jnp.ones(3), "scale": jnp.ones(3)}
  st = tx.init(p)
  g = jax.tree.map(jnp.zeros_like, p)
  u, st = tx.update(g, st, p)  # zero grads: only weight decay moves the kernel
  assert float(u["kernel"][0]) < 0 and float(u["scale"][0]) == 0.0
  for _ in range(5):
    u, st = tx.update(g, st, p)
  assert float(u["kernel"][0]) == 0.0  # second half: no weight decay


@pytest.mark.parametrize("override,match", [
    ({"train.batch_size": 6}, "not divisible by data\\*fsdp"),
    ({"mesh.tensor": 8, "mesh.data": 1, "model.d_model": 36}, "not divisible by mesh.tensor"),
    ({"model.arch": "rwkv"}, "model.arch"),
    ({"model.preset": "7B"}, "preset"),
    ({"data.corpus": "/nonexistent/file.txt"}, "data.corpus"),
    ({"data.corpus": ""}, "data.corpus is empty"),
    ({"optim.schedule": "linear"}, "optim.schedule"),
    ({"train.log_every": 0}, "train.log_every=0 must be >= 1"),
    ({"train.checkpoint_every": -1}, "train.checkpoint_every=-1 must be >= 0"),
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints=0 must be >= 1"),
    ({"train.max_consecutive_skips": 0}, "train.max_consecutive_skips=0 must be >= 1"),
])
def test_bad_config_errors(data_dir, tmp_path, override, match):
  c = small_config(data_dir)
  for k, v in override.items():
    sect, key = k.split(".")
    c[sect][key] = v
  with pytest.raises(ConfigError, match=match):
    loop.run(c, str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad")  # nothing written, not even the workdir


@pytest.mark.parametrize("flag,match", [
    ("--config.model.arch=rwkv", "model.arch='rwkv' is unknown"),
    ("--config.model.d_modle=3", 'Did you mean "d_model"'),
    ("--config=experiments/nope.py", "No such file or directory: 'experiments/nope.py'"),
    ("--config.train.steps=abc", "--config.train.steps=abc"),
])
def test_cli_bad_input_is_one_line_and_nonzero(data_dir, tmp_path, flag, match):
  args, env = _cli(str(tmp_path / "bad"), data_dir, 5, [flag])
  out = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2
  err = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and match in err[0], out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "bad" / "checkpoints")


def test_tiny_model_learns_below_unigram_entropy(data_dir, tmp_path):
  c = small_config(data_dir, steps=120)
  c.model.preset, c.model.d_model = "tiny", 64
  c.train.batch_size, c.data.seq_len = 16, 64
  c.train.eval_batches = 8
  out = loop.run(c, str(tmp_path / "learn"), devices=jax.devices()[:1])
  s = out["summary"]
  with open(os.path.join(tmp_path, "learn", "summary.json")) as f:
    assert json.load(f)["eval_loss"] == s["eval_loss"]
  assert s["eval_loss"] < s["unigram_xent_validation"] - 0.3, s


def test_every_model_field_is_overridable_on_the_command_line():
  """experiments/base.py lists every ModelConfig field, so each takes --config.model.X."""
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415
  from mmfree_jax.config import field_types, from_dict  # noqa: PLC0415
  values = dict(arch="transformer", vocab_size=300, d_model=64, n_layers=3, d_ff=128,
                head_dim=16, gate="paper", lower_bound=False, norm_eps=1e-5, bitlinear_eps=1e-7,
                rope_theta=5e5, dtype="float32", scan_impl="chunked", scan_chunk=4,
                bitlinear_impl="xla", remat="lean", unroll_layers=True, attention_impl="cudnn",
                init_std=0.01)
  assert set(values) == set(field_types())  # a new field needs a value here
  argv = ["prog", f"--config={os.path.join(ROOT, 'experiments', 'tiny.py')}",
          *[f"--config.model.{k}={v}" for k, v in values.items()]]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
  fv(argv)
  cfg = from_dict(fv.config.model)
  assert {k: getattr(cfg, k) for k in values} == values


# --- Reliability: what a cluster does to runs (issue 33) ---------------------------------


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4 (tests work on copies)."""
  wd = str(tmp_path_factory.mktemp("finished") / "run")
  loop.run(small_config(data_dir, steps=4, checkpoint_every=2), wd, devices=jax.devices()[:1])
  return wd


def _copy(run, tmp_path):
  dst = str(tmp_path / "run")
  shutil.copytree(run, dst)
  return dst


def _snapshot(wd):
  """Every file under `wd` with its bytes."""
  out = {}
  for root, _, files in os.walk(wd):
    for f in files:
      with open(os.path.join(root, f), "rb") as fh:
        out[os.path.relpath(os.path.join(root, f), wd)] = fh.read()
  return out


def test_resume_with_another_batch_layout_is_refused_untouched(finished_run, data_dir, tmp_path):
  """Another batch size or sequence length would change the data order and the token count;
  every file of the run stays as it was (config files are written only after a restore)."""
  wd = _copy(finished_run, tmp_path)
  before = _snapshot(wd)
  for key, value, match in (("train.batch_size", 16, "train.batch_size=8 \\(this run: 16\\)"),
                            ("data.seq_len", 64, "data.seq_len=32 \\(this run: 64\\)")):
    c = small_config(data_dir, steps=6)
    sect, k = key.split(".")
    c[sect][k] = value
    with pytest.raises(ConfigError, match=match):
      loop.run(c, wd, devices=jax.devices()[:1])
    assert _snapshot(wd) == before, key


def test_checkpoint_without_token_accounting_still_resumes(finished_run, data_dir, tmp_path, capsys):
  """Checkpoints written before the `meta` item existed: tokens counted as steps x layout."""
  wd = _copy(finished_run, tmp_path)
  shutil.rmtree(os.path.join(wd, "checkpoints", "4", "meta"))
  out = loop.run(small_config(data_dir, steps=4), wd, devices=jax.devices()[:1])
  assert "checkpoint step 4 stores no token count" in capsys.readouterr().out
  assert out["summary"]["tokens_seen"] == 4 * 8 * 32


def test_unreadable_data_iterator_item_is_moved_aside(finished_run, data_dir, tmp_path, capsys):
  wd = _copy(finished_run, tmp_path)
  with open(os.path.join(wd, "checkpoints", "4", "data", "process_0-of-1.json"), "w") as f:
    f.write("{garbage")
  capsys.readouterr()
  out = loop.run(small_config(data_dir, steps=4, checkpoint_every=2), wd, devices=jax.devices()[:1])
  text = capsys.readouterr().out
  assert "checkpoint step 4 is unreadable (data iterator" in text
  assert "resumed from checkpoint step 2" in text
  assert os.path.isdir(os.path.join(wd, "checkpoints_corrupt", "4"))
  assert out["summary"]["tokens_seen"] == 4 * 8 * 32  # steps 3-4 counted once, not twice
  want = {r["step"]: r for r in losses(finished_run)}
  got = {r["step"]: r for r in losses(wd)}  # the retrained rows come last and win
  assert [got[s]["data_fingerprint"] for s in (3, 4)] == [want[s]["data_fingerprint"] for s in (3, 4)]


def test_torn_metrics_line_is_skipped_and_new_rows_start_on_a_new_line(finished_run, data_dir,
                                                                        tmp_path, caplog):
  """A crash mid-write left half a row: rerunning the finished run still finishes."""
  wd = _copy(finished_run, tmp_path)
  path = os.path.join(wd, "metrics.jsonl")
  with open(path, "a") as f:
    f.write('{"step": 5, "loss": 1.2')
  out = loop.run(small_config(data_dir, steps=4), wd, devices=jax.devices()[:1])
  assert "skipped 1 undecodable line(s), the first at line" in caplog.text
  assert out["summary"]["final_loss"] == losses(finished_run)[-1]["loss"]
  writer = MetricWriter(wd)
  writer.write(5, {"loss": 1.0})
  writer.close()
  assert [r["step"] for r in read_jsonl(path) if "loss" in r] == [1, 2, 3, 4, 5]


def test_more_steps_on_resume_is_refused_or_continues_the_lr_smoothly(finished_run, data_dir,
                                                                       tmp_path, capsys):
  """train.steps 4 -> 8: refused by default (one line, files untouched); with
  on_schedule_change=continue, resuming at step 2 uses at step 3 exactly the LR the 4-step run
  used there, then decays to the floor at step 8 (no re-warm)."""
  wd = _copy(finished_run, tmp_path)
  before = _snapshot(wd)
  with pytest.raises(ConfigError) as e:
    loop.run(small_config(data_dir, steps=8), wd, devices=jax.devices()[:1])
  assert "\n" not in str(e.value)
  assert str(e.value).startswith("resuming at step 4 with train.steps=4 -> 8: the LR would jump")
  assert _snapshot(wd) == before
  shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
  capsys.readouterr()
  loop.run(small_config(data_dir, steps=8, on_schedule_change="continue"), wd,
           devices=jax.devices()[:1])
  assert "the LR continues from" in capsys.readouterr().out
  old = {r["step"]: r["lr"] for r in losses(finished_run)}
  new = {r["step"]: r["lr"] for r in losses(wd)}  # the resumed rows come last and win
  assert new[3] == old[3] and new[3] > 0
  lrs = [new[s] for s in range(3, 9)]
  assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.1 * lrs[0]


def test_resume_plan_restart_note_and_refusals():
  c = small_config("", steps=4)
  saved = optim.lr_plan(c)
  assert optim.resume_plan(c, saved, 2) == (saved, None)
  c.train.steps = 8
  c.train.on_schedule_change = "restart"
  plan, note = optim.resume_plan(c, saved, 2)
  assert plan == optim.lr_plan(c) and "the new schedule takes over" in note
  c.train.on_schedule_change = "continue"
  c.optim.peak_lr = 1e-3
  with pytest.raises(ConfigError, match="continue extends train.steps only"):
    optim.resume_plan(c, saved, 2)
  plan, note = optim.resume_plan(c, None, 2)  # a checkpoint from before LR plans
  assert plan == optim.lr_plan(c) and "stores no LR plan" in note


def test_metrics_jsonl_and_tensorboard_agree(finished_run):
  """TensorBoard reads every scalar of metrics.jsonl under its namespaced tag, at the same step
  and wall time (the memory plan's layout names and flags stay in metrics.jsonl); the config
  as hparams and text; no hash as a float scalar."""
  from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415
  from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: PLC0415

  acc = event_accumulator.EventAccumulator(os.path.join(finished_run, "tb"),
                                           size_guidance={"scalars": 0, "tensors": 0})
  acc.Reload()
  rows = read_jsonl(os.path.join(finished_run, "metrics.jsonl"))
  want = {}
  for r in rows:
    for k, v in r.items():
      number = isinstance(v, (int, float)) and not isinstance(v, bool)
      if k not in ("step", "wall_time", "data_fingerprint") and number:
        want.setdefault(tag(k), []).append((r["step"], r["wall_time"], v))
  assert {"train/loss", "train/lr", "train/tokens_seen", "eval/loss", "eval/ppl"} <= set(want)
  assert set(acc.Tags()["scalars"]) == set(want)
  for t, expected in want.items():
    got = [(e.step, e.wall_time, e.value) for e in acc.Scalars(t)]
    assert [(s, w) for s, w, _ in got] == [(s, w) for s, w, _ in expected], t
    np.testing.assert_array_equal([v for *_, v in got], np.float32([v for *_, v in expected]))
  assert all(isinstance(r["data_fingerprint"], int) for r in rows if "loss" in r)
  assert rows[0]["layout_remat"] == "none" and rows[0]["layout_unroll_layers"] is False
  content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
  hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
  assert hp["model.d_model"].number_value == 32 and hp["optim.schedule"].string_value == "mmfree"
  text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
  assert '"d_model": 32' in text


class _FakeWandb:
  """Stands in for the wandb package (no network): records init / log / finish calls."""

  def __init__(self):
    self.calls = []
    self.util = type("util", (), {"generate_id": staticmethod(lambda: "abc123")})

  def init(self, **kw):
    self.calls.append(("init", kw))
    return self

  def log(self, data, step):
    self.calls.append(("log", data, step))

  def finish(self):
    self.calls.append(("finish",))


def test_wandb_sink_is_optional_and_off_by_default(tmp_path, monkeypatch):
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  c = small_config("")
  writer = MetricWriter(str(tmp_path / "off"), c)  # default: train.wandb_project=""
  writer.write(1, {"loss": 2.0})
  writer.close()
  assert fake.calls == []
  c.train.wandb_project = "proj"
  for _ in range(2):  # a resumed run logs to the same W&B run
    writer = MetricWriter(str(tmp_path / "on"), c)
    writer.write(3, {"loss": 2.0, "eval_loss": 2.5, "data_fingerprint": 4146479780})
    writer.close()
  inits = [kw for name, kw, *_ in (x for x in fake.calls if x[0] == "init")]
  assert [kw["id"] for kw in inits] == ["abc123", "abc123"]
  assert inits[0]["project"] == "proj" and inits[0]["config"]["model"]["d_model"] == 32
  assert ("log", {"train/loss": 2.0, "eval/loss": 2.5}, 3) in fake.calls
  monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
  monkeypatch.setattr(setup.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ConfigError, match="train.wandb_project='proj' needs wandb: pip install"):
    setup.validate(c)


class _FullDisk:
  """A commit future that fails like a write to a full disk."""

  def result(self, timeout=None):
    del timeout
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_failed_checkpoint_save_stops_training_at_once(data_dir, tmp_path, monkeypatch):
  """The step-4 save fails in the background: training stops within a step, naming the step,
  the cause and the last good checkpoint, and the failed save leaves nothing behind."""
  save = ocp.StandardCheckpointHandler.async_save

  async def failing_save(self, directory, *args, **kwargs):
    futures = await save(self, directory, *args, **kwargs)
    return [*futures, _FullDisk()] if "/4.orbax-checkpoint-tmp" in str(directory) else futures

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing_save)
  wd = str(tmp_path / "run")
  with pytest.raises(loop.TrainingAborted, match="checkpoint save at step 4 failed \\(No space "
                     "left on device\\); the last good checkpoint is step 2 in "):
    loop.run(small_config(data_dir, steps=12, checkpoint_every=2), wd, devices=jax.devices()[:1])
  assert os.listdir(os.path.join(wd, "checkpoints")) == ["2"]  # no temporary directory left
  assert max(r["step"] for r in losses(wd)) <= 6  # not another checkpoint interval


def test_other_writes_on_a_full_disk_stop_with_one_line(data_dir, tmp_path, monkeypatch):
  def full(path, obj):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

  monkeypatch.setattr(loop.workdir_lib, "write_json", full)
  wd = str(tmp_path / "run")
  with pytest.raises(loop.TrainingAborted, match=f"cannot write {wd}/config.json \\(No space left "
                     "on device\\); training stopped; no checkpoint was saved"):
    loop.run(small_config(data_dir), wd, devices=jax.devices()[:1])


def test_skip_mode_stops_after_too_many_nonfinite_steps_in_a_row(data_dir, tmp_path):
  c = small_config(data_dir, steps=8, on_nonfinite="skip", max_consecutive_skips=2)
  c.optim.peak_lr, c.optim.warmup_steps, c.optim.clip = 1e30, 0, 0.0  # step 1 blows up the params
  # (the loss stays finite at ~10.4: only the gradient norm is NaN from step 2 on)
  with pytest.raises(loop.TrainingAborted, match="3 non-finite steps in a row \\(more than "
                     "train.max_consecutive_skips=2\\), the last: non-finite gradient norm at step 4"):
    loop.run(c, str(tmp_path / "run"), devices=jax.devices()[:1])


def test_nonfinite_report_names_the_culprit_and_counts_skips():
  assert loop.nonfinite_message(3, 2.5, float("inf")).startswith("non-finite gradient norm at step 3")
  assert loop.nonfinite_message(3, float("nan"), float("nan")).startswith("non-finite loss at step 3")
  summary = {"final_loss": 2.0, "eval_loss": 2.1, "eval_ppl": 8.2, "unigram_entropy": 5.0,
             "skipped_steps": 4}
  assert "4 non-finite step(s) skipped" in final_report(summary)
  assert "skipped" not in final_report({**summary, "skipped_steps": 0})


def test_sigterm_before_the_loop_says_nothing_was_saved(data_dir, tmp_path, monkeypatch, capsys):
  prepare = loop.prepare_data

  def prepare_then_sigterm(*args):
    info = prepare(*args)
    os.kill(os.getpid(), signal.SIGTERM)
    return info

  monkeypatch.setattr(loop, "prepare_data", prepare_then_sigterm)
  wd = str(tmp_path / "run")
  out = loop.run(small_config(data_dir), wd, devices=jax.devices()[:1])
  assert out == {"preempted": True, "step": None}
  assert ("preempted (SIGTERM) while preparing data: nothing new was saved; rerun the same "
          "command to resume") in capsys.readouterr().out
  assert not os.path.exists(wd)  # the lock is released and the workdir it created removed


def test_sigterm_during_restore_keeps_the_checkpoint(finished_run, data_dir, tmp_path, monkeypatch,
                                                     capsys):
  """A SIGTERM that lands inside a restore is not mistaken for an unreadable checkpoint."""
  wd = _copy(finished_run, tmp_path)
  before = _snapshot(wd)
  restore = ocp.CheckpointManager.restore

  def sigterm_then_restore(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return restore(self, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", sigterm_then_restore)
  out = loop.run(small_config(data_dir, steps=6), wd, devices=jax.devices()[:1])
  assert out == {"preempted": True, "step": None}
  assert "preempted (SIGTERM) while restoring the newest checkpoint" in capsys.readouterr().out
  assert _snapshot(wd) == before  # nothing moved aside, nothing rewritten


def test_bad_corpus_file_is_one_line_naming_file_and_line(data_dir, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "one"}\n{"text": "two"\n')
  c = small_config(data_dir)
  c.data.corpus = str(bad)
  with pytest.raises(ConfigError, match=f"data.corpus: {bad}:2: not valid JSON"):
    loop.run(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def _sigterm_caught(pid):
  """Whether process `pid` has a SIGTERM handler installed (Linux /proc)."""
  with open(f"/proc/{pid}/status") as f:
    caught = int(next(l for l in f if l.startswith("SigCgt:")).split()[1], 16)
  return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_cli_sigterm_while_starting_exits_zero(data_dir, tmp_path):
  args, env = _cli(str(tmp_path / "run"), data_dir, 5)
  proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  while not _sigterm_caught(proc.pid):
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "preempted (SIGTERM) while" in out and "nothing new was saved" in out, out
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def _namespace_available():
  return subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _namespace_available(), reason="needs `unshare -r -m` to mount a tmpfs")
def test_cli_full_disk_and_read_only_workdir_are_one_line(data_dir, tmp_path):
  """Real filesystems in a private mount namespace: a 40 MiB tmpfs fills up within a few
  checkpoints (each ~15 MiB), and a read-only one cannot take the lock."""
  full, ro = tmp_path / "full", tmp_path / "ro"
  full.mkdir()
  ro.mkdir()
  results = tmp_path / "results.json"
  args_full, env = _cli(str(full / "run"), data_dir, 40, ["--config.train.checkpoint_every=1",
                                                          "--config.train.keep_checkpoints=100"])
  args_ro, _ = _cli(str(ro / "run"), data_dir, 5)
  script = (
      "import json, subprocess, sys\n"
      f"subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=40m', 'none', {str(full)!r}], check=True)\n"
      f"subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro', 'none', {str(ro)!r}], check=True)\n"
      f"out = [subprocess.run(a, capture_output=True, text=True) for a in ({args_full!r}, {args_ro!r})]\n"
      f"steps = sorted(__import__('os').listdir({str(full / 'run' / 'checkpoints')!r}))\n"
      f"json.dump([[o.returncode, o.stderr] for o in out] + [steps], open({str(results)!r}, 'w'))\n")
  subprocess.run(["unshare", "-r", "-m", sys.executable, "-c", script], env=env, cwd=ROOT,
                 check=True, timeout=300)
  (rc_full, err_full), (rc_ro, err_ro), steps = json.loads(results.read_text())
  for rc, err, want in ((rc_full, err_full, 1), (rc_ro, err_ro, 2)):
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert rc == want and len(lines) == 1 and "Traceback" not in err, err[-3000:]
  assert f"cannot write to workdir {ro / 'run'} (Read-only file system)" in err_ro
  failed = int(err_full.split("checkpoint save at step ")[1].split(" ")[0])
  assert "(No space left on device); the last good checkpoint is step " f"{failed - 1}" in err_full
  assert steps == [str(s) for s in range(1, failed)]  # all good ones kept, no temporary directory
