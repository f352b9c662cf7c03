"""Metric sinks: `<workdir>/metrics.jsonl` (one JSON object per logged step), TensorBoard
event files under `<workdir>/tb` (tensorboardX, no TensorFlow), and optionally W&B.

A row is `{"step", "wall_time" (unix seconds), <metric>: value, ...}` with flat keys
(`loss`, `lr`, `eval_loss`, ...). TensorBoard and W&B get the same values at the same step and
wall time under namespaced tags (`tag`): `train/loss`, `train/lr`, ..., `eval/loss`,
`eval/ppl`. Identifiers (`data_fingerprint`, a 32-bit hash) stay exact in metrics.jsonl only:
a float scalar would round them. The run's config goes to TensorBoard once per start, as
hparams (the HParams tab) and as JSON text (the Text tab, tag `config`).

clu.metric_writers would give the same with TensorFlow (~600 MB) behind its SummaryWriter;
tensorboardX writes the same event files without it.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
from tensorboardX import SummaryWriter
from tensorboardX.summary import hparams

IDENTIFIERS = ("data_fingerprint",)
WANDB_ID_FILE = "wandb_run_id"


def tag(key: str) -> str:
  """TensorBoard / W&B tag of a metrics.jsonl key: `eval_loss` -> `eval/loss`, `loss` ->
  `train/loss`."""
  return "eval/" + key[len("eval_"):] if key.startswith("eval_") else "train/" + key


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"model.d_model": 128, ...}: nested sections joined with dots; values that are not
  bool / int / float / str become strings (None -> "None")."""
  out: dict[str, Any] = {}
  for k, v in config.items():
    if isinstance(v, dict):
      out.update(flat_config(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v if isinstance(v, (bool, int, float, str)) else str(v)
  return out


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The JSON objects of `path`, one per line; lines that are not one (a write cut short by
  a crash or a full disk) are skipped with a warning."""
  rows, bad = [], []
  with open(path, errors="replace") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError:
        row = None
      if isinstance(row, dict):
        rows.append(row)
      else:
        bad.append(n)
  if bad:
    logging.warning("%s: skipped %d undecodable line(s), the first at line %d", path, len(bad),
                    bad[0])
  return rows


def _ends_with_newline(path: str) -> bool:
  """True for an empty or missing file, or one whose last byte is a newline."""
  try:
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      return f.read(1) == b"\n"
  except OSError:  # missing, or empty (seek before the start)
    return True


def _scalar(key: str, v: Any) -> bool:
  return (key not in IDENTIFIERS and isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v))


class MetricWriter:
  """Appends to metrics.jsonl, TensorBoard and (when `train.wandb_project` is set) W&B; only
  process 0 writes. `config` (the run's ConfigDict) is recorded in TensorBoard and W&B."""

  def __init__(self, workdir: str, config=None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(workdir, "tb")
    self._wandb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    torn = not _ends_with_newline(self.path)
    self._f = open(self.path, "a")
    if torn:  # a row cut short by a crash: start ours on a new line
      self._f.write("\n")
    self._tb = SummaryWriter(self.tb_dir)
    if config is not None:
      cfg = json.loads(config.to_json_best_effort())
      self._write_config(cfg)
      if config.train.wandb_project:
        self._wandb = _wandb_run(workdir, config.train.wandb_project, cfg)

  def _write_config(self, cfg: dict[str, Any]):
    flat = flat_config(cfg)
    for summary in hparams(flat, {tag("loss"): None, tag("eval_loss"): None}):
      self._tb.file_writer.add_summary(summary)
    self._tb.add_text("config", "```json\n" + json.dumps(cfg, indent=2) + "\n```")

  def write(self, step: int, metrics: dict[str, Any]):
    if not self.enabled:
      return
    row = {"step": int(step), "wall_time": time.time()}
    for k, v in metrics.items():
      row[k] = v.item() if hasattr(v, "item") else v
    scalars = {tag(k): v for k, v in row.items()
               if k not in ("step", "wall_time") and _scalar(k, v)}
    for t, v in scalars.items():
      self._tb.add_scalar(t, v, row["step"], walltime=row["wall_time"])
    self._f.write(json.dumps(row) + "\n")
    self._f.flush()
    if self._wandb is not None:
      self._wandb.log(scalars, step=row["step"])

  def close(self):
    if self.enabled:
      self._f.close()
      self._tb.close()
      if self._wandb is not None:
        self._wandb.finish()


def _wandb_run(workdir: str, project: str, cfg: dict[str, Any]):
  """A W&B run for `workdir`: the same run id on every resume (kept in `wandb_run_id`)."""
  import wandb  # noqa: PLC0415 - optional; loop.validate checks that it is installed

  path = os.path.join(workdir, WANDB_ID_FILE)
  if os.path.exists(path):
    with open(path) as f:
      run_id = f.read().strip()
  else:
    run_id = wandb.util.generate_id()
    with open(path, "w") as f:
      f.write(run_id)
  return wandb.init(project=project, dir=workdir, id=run_id, resume="allow", config=cfg,
                    name=os.path.basename(workdir.rstrip(os.sep)))


def final_report(summary: dict[str, Any]) -> str:
  """The run's closing lines: losses, the unigram baseline, non-finite steps skipped."""
  v = {k: math.nan if summary.get(k) is None else summary[k]
       for k in ("final_loss", "eval_loss", "eval_ppl", "unigram_entropy")}
  text = (f"final train loss {v['final_loss']:.4f} | held-out loss {v['eval_loss']:.4f} "
          f"(ppl {v['eval_ppl']:.1f}) | unigram entropy {v['unigram_entropy']:.4f} nats")
  skipped = summary.get("skipped_steps") or 0
  if skipped:
    text += f"\n{skipped} non-finite step(s) skipped (train.on_nonfinite=skip)"
  return text


def fmt_duration(seconds: float) -> str:
  seconds = max(int(seconds), 0)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
