"""Multi-host input: 2 jax.distributed CPU processes train exactly like 1 process."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import tiny
from mmfree_jax import multihost
from mmfree_jax.config import ConfigError
from mmfree_jax.data import builder, pipeline
from mmfree_jax.train import loop
from mmfree_jax.train.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"model.preset": "micro", "model.d_model": 32, "model.n_layers": 2, "data.seq_len": 32,
             "train.batch_size": 8, "train.steps": 20, "train.log_every": 1, "train.eval_every": 0,
             "train.eval_batches": 2, "train.checkpoint_every": 0, "train.sample_tokens": 0}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("mh_data"))


def _rows(workdir):
  return read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def test_two_processes_train_like_one_through_preemption_and_resume(data_dir, tmp_path):
  """1 process x 4 devices vs 2 processes x 2 devices (gloo collectives), mesh data=4.

  The 2-process run is SIGTERMed mid-way (both processes must stop at the same step,
  save and exit 0) and resumed. The global batches are identical (every process runs the
  global pipeline and keeps its rows), so the per-device shards and the program are the
  same; only the cross-process all-reduce differs: it sums the 4 devices' gradients in
  another order, so the first step's gradients already differ by float rounding (checked:
  ~1e-9 absolute, also before the BitLinear group kernels, whose losses happened to round
  equal). Such a difference stays at float-rounding size until it moves a value across an
  8-bit rounding boundary, which flips that activation's code: seen ~2e-5 relative at most
  steps and 1.9e-4 at one step of 20 (BitLinear eps 1e-6). Tolerance: the median step's
  loss and the held-out loss to 1e-4 relative, every step's loss to 1e-3 (a few flipped
  codes); batch fingerprints (crc32 of the global batch) exactly.
  """
  c = tiny.get_config()
  for k, v in OVERRIDES.items():
    sect, key = k.split(".")
    c[sect][key] = v
  c.data.data_dir = data_dir
  one = str(tmp_path / "one")
  loop.run(c, one, devices=jax.devices()[:4])  # also builds the dataset the others reuse

  two = str(tmp_path / "two")
  extra = [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + [f"--config.data.data_dir={data_dir}"]
  args = [sys.executable, "-m", "launch.local", "--config=experiments/tiny.py", f"--workdir={two}",
          "--num_processes=2", "--platform=cpu", "--devices_per_process=2", "--", *extra]
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = os.path.join(two, "metrics.jsonl")
  t0 = time.time()
  while not (os.path.exists(metrics) and any(r.get("step", 0) >= 3 for r in _rows(two))):
    assert proc.poll() is None and time.time() - t0 < 180, proc.communicate()
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)  # the launcher forwards it to both processes
  out, err = proc.communicate(timeout=180)
  log1 = open(os.path.join(two, "logs", "process_1.log")).read()
  assert proc.returncode == 0, (err[-3000:], log1[-3000:])
  stopped = int(out.split("checkpoint saved at step ")[1].split(";")[0])
  assert f"checkpoint saved at step {stopped};" in log1  # process 1 stopped at the same step
  assert 3 <= stopped < OVERRIDES["train.steps"]
  ckpt = os.path.join(two, "checkpoints", str(stopped))
  assert sorted(f for f in os.listdir(os.path.join(ckpt, "data")) if f.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]  # every process took part in the save

  out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from checkpoint step {stopped}" in out.stdout
  assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in out.stdout

  a, b = _rows(one), _rows(two)
  la = {r["step"]: r for r in a if "loss" in r}
  lb = {r["step"]: r for r in b if "loss" in r}  # resumed rows come last and win
  steps = list(range(1, OVERRIDES["train.steps"] + 1))
  assert sorted(lb) == steps
  lossa, lossb = (np.array([l[s]["loss"] for s in steps]) for l in (la, lb))
  np.testing.assert_allclose(lossb, lossa, rtol=1e-3)
  assert np.median(np.abs(lossb / lossa - 1)) <= 1e-4
  assert [lb[s]["data_fingerprint"] for s in steps] == [la[s]["data_fingerprint"] for s in steps]
  ea, eb = [r for r in a if "eval_loss" in r], [r for r in b if "eval_loss" in r]
  np.testing.assert_allclose(eb[-1]["eval_loss"], ea[-1]["eval_loss"], rtol=1e-4)
  assert eb[-1]["eval_tokens"] == ea[-1]["eval_tokens"]


def test_rows_mode_splits_the_global_batch_and_checkpoints(data_dir):
  info = builder.prepare("shakespeare", data_dir)
  make = lambda mode, p, n, b: pipeline.make_iterator(info, "train", b, 16, seed=3, process_index=p,
                                                      process_count=n, process_shard=mode, prefetch=0)
  glob = make("rows", 0, 1, 6)
  parts = [make("rows", p, 3, 2) for p in range(3)]
  docs = [make("documents", p, 3, 2) for p in range(3)]
  for _ in range(3):
    want = next(glob)
    got = [next(it) for it in parts]
    for k in want:
      np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])
    d = np.concatenate([next(it)["inputs"] for it in docs])
    assert not np.array_equal(d, want["inputs"])  # document sharding: another global batch
  state = parts[1].get_state()
  nxt = next(parts[1])
  fresh = make("rows", 1, 3, 2)
  fresh.set_state(json.loads(json.dumps(state)))  # as restored from the JSON checkpoint
  np.testing.assert_array_equal(next(fresh)["inputs"], nxt["inputs"])
  with pytest.raises(ValueError, match="process_shard"):
    make("hosts", 0, 1, 2)


@pytest.mark.parametrize("env,match", [
    ({"JAX_NUM_PROCESSES": "2"}, "together"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "must be in"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "integers"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "host:port"),
])
def test_distributed_env_errors(env, match):
  with pytest.raises(ConfigError, match=match):
    multihost.distributed_args(env)


def test_distributed_env_conventions(monkeypatch):
  ok = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert multihost.distributed_args(ok) == {"coordinator_address": "10.0.0.1:1234",
                                            "num_processes": 4, "process_id": 3}
  assert multihost.distributed_args({"SLURM_NTASKS": "16"}) == {}  # jax auto-detects SLURM
  assert multihost.wants_distributed(ok)
  assert multihost.wants_distributed({"SLURM_NTASKS": "16"})
  assert multihost.wants_distributed({"MMFREE_DISTRIBUTED": "1"})
  assert multihost.wants_distributed({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1:8080"})
  assert not multihost.wants_distributed({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})
  for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "MMFREE_DISTRIBUTED",
            "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  assert multihost.initialize() is False  # one process: nothing to initialize
