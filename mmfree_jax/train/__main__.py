"""`python -m mmfree_jax.train --config=experiments/tiny.py --workdir=runs/tiny`

Trains (or resumes) as configured, evaluates on the held-out split, prints a sample
and where the run's files are. Bad config/data -> one-line error, exit 2.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mmfree_jax import cli
from mmfree_jax.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/tiny.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "Run directory (checkpoints, logs).")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  # Imported after flag parsing: keeps --help fast.
  from mmfree_jax.data.tokenizer import load_tokenizer  # noqa: PLC0415
  from mmfree_jax.infer.generate import generate  # noqa: PLC0415
  from mmfree_jax.interop import checkpoint  # noqa: PLC0415
  from mmfree_jax.train import loop  # noqa: PLC0415
  workdir = os.path.abspath(_WORKDIR.value)
  config = cli.load_config(_CONFIG)
  try:
    out = loop.run(config, workdir)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except loop.TrainingAborted as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if out.get("preempted"):
    return
  s = out["summary"]
  model_dir = os.path.join(workdir, "model")
  checkpoint.save_model(model_dir, out["cfg"], out["state"].params)
  n = config.train.sample_tokens
  if n > 0:
    tok = load_tokenizer(config.data.tokenizer or None)
    prompt = "ROMEO:"
    gen = generate(out["cfg"], out["state"].params, [[tok.bos_id, *tok.encode(prompt)]], n,
                   eos_id=tok.eos_id)
    print(f"\nsample (greedy, {n} tokens) >>> {prompt}{tok.decode(gen.row(0))}\n")
  print(f"final train loss {s['final_loss']:.4f} | held-out loss {s.get('eval_loss', float('nan')):.4f} "
        f"(ppl {s.get('eval_ppl', float('nan')):.1f}) | unigram entropy {s['unigram_entropy']:.4f} nats")
  print(f"run directory: {workdir}")
  print(f"  metrics:     {workdir}/metrics.jsonl, summary.json")
  print(f"  tensorboard: tensorboard --logdir {workdir}/tb")
  print(f"  checkpoints: {workdir}/checkpoints")
  print(f"  model:       {model_dir}  (python -m mmfree_jax.generate --checkpoint {model_dir} "
        "--prompt 'ROMEO:')")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
