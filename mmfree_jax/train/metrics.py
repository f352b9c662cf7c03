"""Metric sinks: `<workdir>/metrics.jsonl` (one JSON object per logged step) and
TensorBoard event files under `<workdir>/tb` (tensorboardX, no TensorFlow)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from absl import logging
import jax
from tensorboardX import SummaryWriter


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


class MetricWriter:
  """Appends to metrics.jsonl and TensorBoard; only process 0 writes."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(workdir, "tb")
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      torn = not _ends_with_newline(self.path)
      self._f = open(self.path, "a")
      if torn:  # a row cut short by a crash: start ours on a new line
        self._f.write("\n")
      self._tb = SummaryWriter(self.tb_dir)

  def write(self, step: int, metrics: dict[str, Any]):
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      v = v.item() if hasattr(v, "item") else v
      row[k] = v
      if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._f.write(json.dumps(row) + "\n")
    self._f.flush()

  def close(self):
    if self.enabled:
      self._f.close()
      self._tb.close()


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
