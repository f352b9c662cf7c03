"""Checkpoint interop: HF `hgrn_bit` checkpoints (`hf`), the 2-bit packed format (`packed`),
model directories of every format (`checkpoint`), the official code's fixtures (`official`)
and an independent float64 NumPy reference of the released model (`reference_numpy`).

    cfg, params = checkpoint.load_model("/path/to/hf_or_our_dir")
"""


class CheckpointError(ValueError):
  """A checkpoint that cannot be read as asked; the message names the problem and the fix."""
