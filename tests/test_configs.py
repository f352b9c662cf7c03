"""Every config in experiments/ (base, tiny, the paper points, each sweep's base), both
arches, shrunk to a micro model, trains one step on CPU under its own mesh: the platform
defaults ("auto" attention, the CUDA kernels' fallbacks) hold off-GPU."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import base, sweeps, tiny
from mmfree_jax import multihost, sharding
from mmfree_jax.config import ARCHS, ConfigError
from mmfree_jax.train import setup
from mmfree_jax.train.optim import make_optimizer
from mmfree_jax.train.step import init_state, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = ["--config.model.preset=micro", "--config.model.d_model=32", "--config.model.n_layers=2",
         "--config.model.head_dim=16", "--config.data.seq_len=64", "--config.train.batch_size=8"]


def shrink(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with a micro model, short rows and a small batch; all else as it is."""
  c = ml_collections.ConfigDict(c.to_dict())
  c.model.update(preset="micro", d_model=32, n_layers=2, head_dim=16, vocab_size=256)
  c.data.update(seq_len=64, corpus="shakespeare")
  c.train.batch_size = 8
  return c


def _configs():
  """(name, shrunk config), one per distinct model / mesh / step setting."""
  found = [("base", base.get_config())]
  found += [(f"tiny:{a}", tiny.get_config(a)) for a in ARCHS]
  found += [(f"paper:{n}", c) for n, c in sweeps.points("paper")]
  for sweep in sweeps.SWEEPS:
    for a in ARCHS:
      c = sweeps.get_config(sweep)
      c.model.arch = a
      found.append((f"sweeps:{sweep}:{a}", c))
  seen, out = set(), []
  for name, c in found:
    c = shrink(c)
    key = (c.model.to_json(), c.mesh.to_json(), c.train.grad_accum)
    if key not in seen:
      seen.add(key)
      out.append(pytest.param(c, id=name))
  return out


@pytest.mark.parametrize("config", _configs())
def test_config_trains_a_step_on_cpu(config):
  cfg = setup.validate(config)
  mesh = multihost.make_mesh(config.mesh.to_dict(), jax.devices())
  sharding.check_divisible(cfg, mesh, config.train.batch_size)
  tx, sched = make_optimizer(config, config.train.steps)
  b, t = config.train.batch_size, config.data.seq_len
  tokens = jax.random.randint(jax.random.key(0), (b, t + 1), 0, cfg.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": jnp.repeat(jnp.array([1, 2], jnp.int32), t // 2)[None].repeat(b, 0),
           "weights": jnp.ones((b, t), jnp.float32)}
  with jax.set_mesh(mesh):
    state = init_state(cfg, tx, mesh, 0)
    step = jax.jit(make_train_step(cfg, tx, config.train.grad_accum, sched), donate_argnums=0)
    state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
  assert int(state.step) == 1 and int(state.skipped) == 0
  assert np.isfinite(float(metrics["loss"]))


def test_cudnn_off_gpu_is_a_config_error_before_compiling():
  c = shrink(tiny.get_config("transformer"))
  c.model.attention_impl = "cudnn"
  cfg = setup.validate(c)
  tx, _ = make_optimizer(c, 1)
  mesh = multihost.make_mesh({"data": 1}, jax.devices()[:1])
  with jax.set_mesh(mesh), pytest.raises(ConfigError, match="runs only on CUDA GPUs, not on cpu"):
    init_state(cfg, tx, mesh, 0)


def test_train_cli_cudnn_off_gpu_is_one_line(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [sys.executable, "-m", "mmfree_jax.train", "--config=experiments/paper.py:transformer-370M",
       *MICRO, "--config.data.corpus=shakespeare", f"--config.data.data_dir={tmp_path}",
       "--config.model.attention_impl=cudnn", f"--workdir={tmp_path / 'run'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == (
      "error: model.attention_impl='cudnn' runs only on CUDA GPUs, not on cpu; use 'auto' "
      "(cuDNN on GPUs, splash on TPUs, XLA elsewhere) or 'xla'"), out.stderr[-2000:]
