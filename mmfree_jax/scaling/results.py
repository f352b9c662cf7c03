"""Reading sweep outputs: the results table, per-run metrics, trained params; the paper's
published points (SPEC §4).

    rows = load_results(study_dir(ROOT))         # results.csv -> list of dicts
    curve = read_metrics("runs/micro/mmfree-d32-L2")
    cfg, params = load_point_params("runs/micro/mmfree-d32-L2")
"""

from __future__ import annotations

import csv
import functools
import json
import os
from typing import Any

INT_COLS = ("d_model", "n_layers", "d_ff", "seq_len", "batch_size", "steps", "params",
            "non_embedding_params", "flops_params", "runs")
STR_COLS = ("name", "arch", "schedule")

# Final losses read off the paper's Fig. 3 / text (SPEC §4). The 1.3B points are left out:
# SPEC gives no number for them and we do not guess values off the figure.
PAPER_LOSS = {("transformer", "370M"): 2.61, ("mmfree", "370M"): 2.90,
              ("transformer", "2.7B"): 2.09, ("mmfree", "2.7B"): 2.23}
PAPER_TOKENS = {"370M": 15e9, "1.3B": 100e9, "2.7B": 100e9}
# The paper's fitted lines as read off Fig. 3 (SPEC §4): loss per decade, crossover.
PAPER_SLOPE = {"mmfree": -0.35, "transformer": -0.27}
PAPER_CROSSOVER_C = 6e22
PAPER_CROSSOVER_LOSS = 1.7
PAPER_LABEL = "paper (read off Fig. 3)"
STUDY = os.path.join("results", "mini")  # the committed GPU study, relative to the repo root
MICRO = os.path.join("runs", "micro")  # the CPU micro sweep's default workdir


class ResultsError(ValueError):
  """Missing or unreadable sweep results; the message says what to run."""


def _num(v: str) -> Any:
  if v == "":
    return None
  try:
    return float(v)
  except ValueError:
    return v


def load_results(path: str) -> list[dict[str, Any]]:
  """Rows of `<dir>/results.csv` (or a .csv / .jsonl path) with numeric columns parsed."""
  if os.path.isdir(path):
    path = os.path.join(path, "results.csv")
  if not os.path.isfile(path):
    raise ResultsError(f"no results table at {path}; run `python -m mmfree_jax.sweep "
                       "--sweep=experiments/sweeps.py:micro --workdir=DIR` first")
  if path.endswith(".jsonl"):
    with open(path) as f:
      return [json.loads(line) for line in f if line.strip()]
  with open(path, newline="") as f:
    rows = []
    for raw in csv.DictReader(f):
      r = {k: (v if k in STR_COLS else _num(v)) for k, v in raw.items()}
      for k in INT_COLS:
        if r.get(k) is not None:
          r[k] = int(r[k])
      rows.append(r)
  return rows


def study_dir(root: str) -> str:
  """Results a notebook reads: $MMFREE_RESULTS if set, else the committed study
  (`<root>/results/mini`) when it holds results, else the micro sweep's `<root>/runs/micro`."""
  if os.environ.get("MMFREE_RESULTS"):
    return os.environ["MMFREE_RESULTS"]
  study = os.path.join(str(root), STUDY)
  return study if os.path.isfile(os.path.join(study, "results.csv")) else os.path.join(
      str(root), MICRO)


def corpus(workdir: str, rows: list[dict[str, Any]]) -> str | None:
  """The training corpus of the sweep (`data.corpus` of its first point's config.json)."""
  for r in rows:
    path = os.path.join(workdir, r["name"], "config.json")
    if os.path.isfile(path):
      with open(path) as f:
        return json.load(f).get("data", {}).get("corpus") or None
  return None


def read_metrics(point_dir: str) -> list[dict[str, Any]]:
  """`metrics.jsonl` rows of one run; a resumed run's repeated steps keep the last row; a
  line torn by a crash is skipped with a warning (`train.metrics.read_jsonl`)."""
  from mmfree_jax.train.metrics import read_jsonl  # noqa: PLC0415

  path = os.path.join(point_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise ResultsError(f"no metrics.jsonl in {point_dir}")
  by_key = {(r["step"], "loss" in r): r for r in read_jsonl(path) if "step" in r}
  return [by_key[k] for k in sorted(by_key)]


def load_point_params(point_dir: str, step: int | None = None):
  """(ModelConfig, params) from a run directory's newest (or given) trainer checkpoint."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from mmfree_jax.config import from_dict  # noqa: PLC0415
  from mmfree_jax.train import checkpoint as ckpt  # noqa: PLC0415
  with open(os.path.join(point_dir, "model_config.json")) as f:
    cfg = from_dict(json.load(f))
  mngr = ckpt.make_manager(point_dir, keep=None)
  steps = mngr.all_steps()
  if not steps:
    raise ResultsError(f"no checkpoint in {point_dir}/checkpoints")
  step = max(steps) if step is None else step
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  mngr.close()
  return cfg, state["params"]


def paper_points() -> list[dict[str, Any]]:
  """The paper's published final losses with C = 6 N D (N: all params but the input
  embedding, our `flops.flops_params`; D: 15B / 100B tokens)."""
  out = []
  for (arch, size), loss in PAPER_LOSS.items():
    n = _flops_params(size, arch)
    out.append({"name": f"paper {arch} {size}", "arch": arch, "size": size, "flops_params": n,
                "tokens": PAPER_TOKENS[size], "flops": 6.0 * n * PAPER_TOKENS[size],
                "final_loss": loss})
  return out


@functools.lru_cache(maxsize=None)
def _flops_params(size: str, arch: str) -> int:
  """N of 6ND for a paper preset (traced once per process: ~0.4 s each)."""
  from mmfree_jax.config import preset  # noqa: PLC0415
  from mmfree_jax.scaling.flops import flops_params  # noqa: PLC0415
  return flops_params(preset(size, arch))
