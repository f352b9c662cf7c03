"""Metric sinks: `<workdir>/metrics.jsonl` (one JSON object per logged step) and
TensorBoard event files under `<workdir>/tb` (tensorboardX, no TensorFlow)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
from tensorboardX import SummaryWriter


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
  """Appends to metrics.jsonl and TensorBoard; only process 0 writes."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(workdir, "tb")
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._f = open(self.path, "a")
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


def fmt_duration(seconds: float) -> str:
  seconds = max(int(seconds), 0)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
