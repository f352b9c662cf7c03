"""Base config: every knob of `python -m mmfree_jax.train`, with its default.

Other experiment files start from `base.get_config()` and override what they change.
Override anything on the command line: `--config.model.d_model=256 --config.train.steps=100`.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from mmfree_jax.config import field_types


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # Model: every field of mmfree_jax.config.ModelConfig (derived from the dataclass, whose
  # docstring explains each), so any can be overridden: --config.model.bitlinear_eps=1e-6.
  # `preset` picks d_model/n_layers (tiny/micro also head_dim/scan_chunk); a key left None
  # takes the preset's value, else the ModelConfig default (e.g. norm_eps 1e-6,
  # bitlinear_eps 1e-6, init_std 0.02, rope_theta 1e4, d_ff from SPEC's 256-rounding rule).
  c.model = ml_collections.ConfigDict(
      {"preset": "tiny", **{k: placeholder(t) for k, t in field_types().items()}})
  c.model.update(
      arch="mmfree",          # mmfree | transformer
      vocab_size=32000,       # must match the tokenizer (Mistral 32k by default)
      gate="code",            # code: RMSNorm(g)*silu(h) (released ckpts) | paper: sigmoid(g)*h
      dtype="bfloat16",       # compute dtype; master weights are always float32
      scan_impl="pallas",     # one of config.SCAN_IMPLS: pallas (GPU kernels; associative elsewhere)
      scan_chunk=8,
      bitlinear_impl="pallas",  # pallas (fused kernels around the matmuls on GPU; XLA elsewhere) | xla
      remat="none",           # none | lean | lean_inputs | full (memory-saving modes) | auto (the trainer picks remat, unroll_layers and grad_accum: train/memory.py)
      unroll_layers=False,    # True: blocks as straight-line code (faster step, slower compile; not with remat=full)
      attention_impl="auto",  # auto (cuDNN on GPUs, splash on TPUs, XLA elsewhere) | xla | cudnn | splash
  )

  # Data: a tokenized tfds dataset built from local files (mmfree_jax.data.builder).
  c.data = ml_collections.ConfigDict(dict(
      corpus="shakespeare",   # "shakespeare" (embedded, offline) or comma-separated local files/globs
      text_field="text",      # JSONL field holding the text
      data_dir="",            # where the prepared dataset lives ("" = ~/.cache/mmfree_jax/data)
      tokenizer="",           # SentencePiece .model ("" = Mistral's tokenizer.model.v1)
      seq_len=128,
      worker_count=0,         # grain workers (0 = in-process; best on small machines)
      process_shard="rows",   # rows: every process packs the same global batch and keeps its
                              # rows (same training for any process count); documents: each
                              # process reads 1/P of the documents (huge corpora)
  ))

  c.train = ml_collections.ConfigDict(dict(
      seed=0,
      batch_size=16,          # global sequences per step
      grad_accum=1,           # micro-batches per step (batch_size must divide evenly)
      steps=1000,
      log_every=10,
      eval_every=200,         # held-out loss every N steps (0 = only at the end)
      eval_batches=8,
      checkpoint_every=200,   # 0 = only at the end
      keep_checkpoints=3,
      on_schedule_change="refuse",  # resumed with other steps/schedule: refuse | continue | restart (train/optim.py)
      on_nonfinite="abort",   # abort | skip  (a NaN/inf step is never checkpointed)
      max_consecutive_skips=10,  # skip: stop after more non-finite steps than this in a row
      sample_tokens=0,        # generate a sample of N tokens at the end (0 = off)
      profile_steps="",       # e.g. "20,25": jax.profiler trace into workdir/profile
      wandb_project="",       # also log to this W&B project ("" = off; needs `pip install wandb`)
  ))

  # AdamW (SPEC §3). schedule: mmfree (cosine, halved at the midpoint) | cosine | constant
  c.optim = ml_collections.ConfigDict(dict(
      peak_lr=4e-3,
      schedule="mmfree",
      min_lr_ratio=0.0,       # cosine floor as a fraction of peak (Transformer++: 0.1)
      warmup_frac=0.01,
      warmup_steps=-1,        # >= 0 overrides warmup_frac
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      wd_off_at_midpoint=False,  # BitNet: no weight decay in the second half
      clip=1.0,               # global-norm clip (0 = off)
  ))

  # Mesh over all devices: -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c
