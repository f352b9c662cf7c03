"""The `tiny` preset (d=64, L=2) on the embedded Shakespeare corpus: the CPU demo (`make demo`).

    python -m mmfree_jax.train --config=experiments/tiny.py --workdir=runs/tiny
    python -m mmfree_jax.train --config=experiments/tiny.py:transformer --workdir=runs/tiny_tpp
"""

from experiments import base


def get_config(arch: str = "mmfree"):
  c = base.get_config()
  c.model.preset = "tiny"
  c.model.arch = arch
  c.model.dtype = "float32"   # CPU: bf16 matmuls are emulated and slow
  c.data.seq_len = 128
  c.train.batch_size = 16
  c.train.steps = 500
  c.train.log_every = 25
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  c.train.sample_tokens = 48
  c.optim.peak_lr = 4e-3 if arch == "mmfree" else 1e-3
  if arch == "transformer":
    c.optim.schedule, c.optim.min_lr_ratio = "cosine", 0.1
  return c
