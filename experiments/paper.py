"""The paper's configurations (SPEC §2-3): `--config=experiments/paper.py:mmfree-1.3B`.

Arg: `<arch>-<size>` with arch in {mmfree, transformer} and size in {370M, 1.3B, 2.7B}.
Tokens: 15B (370M) / 100B (1.3B, 2.7B) at sequence 2048; global batch 256 sequences
(0.5M tokens) — set `train.batch_size` and the mesh for your pod.
"""

from experiments import base

PEAK_LR = {"370M": 4e-3, "1.3B": 2.5e-3, "2.7B": 1.5e-3}
TOKENS = {"370M": 15e9, "1.3B": 100e9, "2.7B": 100e9}


def get_config(arg: str = "mmfree-370M"):
  arch, size = arg.split("-", 1)
  c = base.get_config()
  c.model.preset, c.model.arch = size, arch
  c.data.seq_len = 2048
  c.data.corpus = ""  # set to your prepared SlimPajama files
  c.train.batch_size = 256
  c.train.steps = int(TOKENS[size] // (256 * 2048))
  c.train.log_every = 50
  c.train.eval_every = 2000
  c.train.checkpoint_every = 1000
  c.model.remat = "auto"  # the fastest layout that fits the card (train/memory.py)
  c.mesh.data, c.mesh.fsdp = 1, -1
  if arch == "mmfree":
    c.optim.peak_lr, c.optim.schedule = PEAK_LR[size], "mmfree"
  else:
    c.optim.peak_lr, c.optim.schedule, c.optim.min_lr_ratio = 3e-4, "cosine", 0.1
  return c
