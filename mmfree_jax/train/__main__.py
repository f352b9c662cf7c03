"""`python -m mmfree_jax.train --config=experiments/tiny.py --workdir=runs/tiny`

Trains (or resumes), evaluates, prints a sample and where the run's files are. Bad input
-> one line, exit 2; training stopped on purpose (non-finite steps, a failed save) -> one
line, exit 1; SIGTERM -> a line saying what is saved, exit 0. The step's compiled peak is
checked against the device before the first step (`train/memory.py`: model.remat=auto picks
a layout that fits; GPUs preallocate 0.95 of the card unless XLA_PYTHON_CLIENT_* say else)."""

from __future__ import annotations

import importlib.util
import logging as std_logging
import os
import signal
import sys

from absl import flags, logging
from ml_collections import config_flags

from mmfree_jax import cli
from mmfree_jax.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/tiny.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "Run directory (checkpoints, logs).")


class _DropOrbaxErrors(std_logging.Filter):
  """Orbax logs a failed background save from each of its threads, with tracebacks; the
  trainer reports it in one line (`--verbosity` shows them again)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.levelno >= std_logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def _drop_closed_loop_noise(hook=sys.unraisablehook):
  """After a failed checkpoint write, TensorStore's pending callbacks find Orbax's event loop
  closed (or the interpreter exiting) and print one traceback each, over a hundred for one
  full disk; those are dropped, any other unraisable exception is printed as usual."""

  def unraisable(u):
    msg = str(u.exc_value)
    if not ("Event loop is closed" in msg or "Python is likely shutting down" in msg):
      hook(u)

  sys.unraisablehook = unraisable


def _on_sigterm(what: str, at_once: bool = False):
  """Outside `loop.run` (which handles SIGTERM itself): say `what` is saved, exit 0.
  `at_once` (nothing written yet) exits without unwinding: a SystemExit raised while a C
  extension initialises becomes "ImportError: initialization failed" and exit 1."""

  def handler(signum, frame):
    del signum, frame
    print(f"preempted (SIGTERM) {what}; rerun the same command to resume", flush=True)
    if at_once:
      sys.stderr.flush()
      os._exit(0)
    sys.exit(0)

  signal.signal(signal.SIGTERM, handler)


def main(argv):
  del argv
  from mmfree_jax.train import memory  # noqa: PLC0415
  memory.set_allocator_defaults()  # before JAX creates its GPU backend
  cli.quiet_output()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    logging.get_absl_handler().addFilter(_DropOrbaxErrors())
    _drop_closed_loop_noise()
  _on_sigterm("while starting: nothing new was saved", at_once=True)
  # Imported after flag parsing: keeps --help fast.
  from mmfree_jax.data.tokenizer import load_tokenizer  # noqa: PLC0415
  from mmfree_jax.infer.generate import generate  # noqa: PLC0415
  from mmfree_jax.interop import checkpoint  # noqa: PLC0415
  from mmfree_jax import multihost  # noqa: PLC0415
  from mmfree_jax.train import loop, metrics  # noqa: PLC0415
  distributed = multihost.wants_distributed()
  if distributed:  # jax.distributed's preemption notifier owns SIGTERM from here on
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
  workdir = os.path.abspath(_WORKDIR.value)
  config = cli.load_config(_CONFIG)
  try:
    out = loop.run(config, workdir)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(cli.BAD_INPUT)
  except loop.TrainingAborted as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if out.get("preempted"):
    return
  if not distributed:
    _on_sigterm(f"while exporting the model: the final checkpoint (step {config.train.steps}) "
                "is saved")
  s = out["summary"]
  tok = load_tokenizer(config.data.tokenizer or None)
  model_dir, status = checkpoint.export_run(workdir, out["cfg"], out["state"].params,
                                            int(out["state"].step), tok.path)
  n = config.train.sample_tokens
  if n > 0:
    prompt = "ROMEO:"
    gen = generate(out["cfg"], out["state"].params, [[tok.bos_id, *tok.encode(prompt)]], n,
                   eos_id=tok.eos_id)
    print(f"\nsample (greedy, {n} tokens) >>> {prompt}{tok.decode(gen.row(0))}\n")
  print(metrics.final_report(s))
  print(f"run directory: {workdir}")
  print(f"  metrics:     {workdir}/metrics.jsonl, summary.json")
  viewer = "" if importlib.util.find_spec("tensorboard") else "  (pip install tensorboard)"
  print(f"  tensorboard: tensorboard --logdir {workdir}/tb{viewer}")
  print(f"  checkpoints: {workdir}/checkpoints")
  what = {"written": "model/latest", "unchanged": "model/latest, exported before",
          "kept": "holds an export of other params, not replaced: remove it to re-export"}
  print(f"  model:       {model_dir} ({what[status]})")
  print(f"  generate:    python -m mmfree_jax.generate --checkpoint {workdir} --prompt 'ROMEO:'")


if __name__ == "__main__":
  cli.run(main, absl_flags=True)
