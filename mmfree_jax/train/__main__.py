"""`python -m mmfree_jax.train --config=experiments/tiny.py --workdir=runs/tiny`

Trains (or resumes) as configured, evaluates on the held-out split, prints a sample
and where the run's files are. Bad config/data -> one-line error, exit 2.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mmfree_jax.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/tiny.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "Run directory (checkpoints, logs).")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  from mmfree_jax.train import loop  # noqa: PLC0415 (after flag parsing: keeps --help fast)
  workdir = os.path.abspath(_WORKDIR.value)
  try:
    out = loop.run(_CONFIG.value, workdir)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except loop.TrainingAborted as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if out.get("preempted"):
    return
  s = out["summary"]
  if _CONFIG.value.train.sample_tokens > 0:
    from mmfree_jax.infer import generate  # noqa: PLC0415
    text = generate.sample_text(out["cfg"], out["state"].params, "ROMEO:",
                                _CONFIG.value.train.sample_tokens, _CONFIG.value.data.tokenizer or None)
    print(f"\nsample (greedy) >>> ROMEO:{text}\n")
  print(f"final train loss {s['final_loss']:.4f} | held-out loss {s.get('eval_loss', float('nan')):.4f} "
        f"(ppl {s.get('eval_ppl', float('nan')):.1f}) | unigram entropy {s['unigram_entropy']:.4f} nats")
  print(f"run directory: {workdir}")
  print(f"  metrics:     {workdir}/metrics.jsonl, summary.json")
  print(f"  tensorboard: tensorboard --logdir {workdir}/tb")
  print(f"  checkpoints: {workdir}/checkpoints")


if __name__ == "__main__":
  app.run(main)
