"""Scaling-law sweeps: the grids live next to their configs (big_vision style).

    python -m mmfree_jax.sweep --sweep=experiments/sweeps.py:micro --workdir=runs/micro
    python -m mmfree_jax.train --config=experiments/sweeps.py:micro/mmfree-d32-L2 --workdir=...

`get_config("<sweep>")` is the base every point of that sweep starts from;
`get_sweep("<sweep>")` lists the points as override dicts `{"name": ..., "<section>.<key>":
value}` relative to the base; `get_config("<sweep>/<point>")` is the base with one point's
overrides.

Sweeps (`python -m mmfree_jax.sweep --sweep=experiments/sweeps.py:NAME --plan` prints
params, tokens, FLOPs, tokens/param, epochs and planned H200 time per point):
  paper     370M / 1.3B / 2.7B x {mmfree, transformer}, SPEC §2-3 recipes (for pods).
  mini      the L(N, D) grid: 6 sizes per arch (133k..7M non-embedding params, 53x) x
            10 / 20 / 40 tokens per non-embedding param, both arches (36 points), seq 512;
            every run < 10 min on one H100/H200. Corpus: Python sources
            (`mmfree_jax.data.corpus`).
  mini_lr   learning-rate axis at mini's d=128, 20 tokens/param point, x{1/4, 1/2, 2, 4},
            both arches (run it into the mini workdir: the x1 points are shared).
  micro     d in {16, 32, 64} x both arches (non-embedding params 27k..133k, 4.9x), 2
            layers, 32 steps of 8x64 tokens of the embedded Shakespeare, float32: CPU and
            tests (~25 s per point on 2 cores, mostly XLA compile).
  micro_lr  learning-rate axis at micro's mmfree d=32 point: 3e-3, 1e-2, 3e-2 (run it
            into the micro workdir: the 1e-2 point is shared).
"""

from __future__ import annotations

import functools

import ml_collections

from experiments import base
from experiments import paper as paper_exp

SWEEPS = ("paper", "mini", "mini_lr", "micro", "micro_lr")

# Corpus of the mini sweep: write it once with
#   python -m mmfree_jax.data.corpus --out=runs/corpus/python_sources.jsonl
MINI_CORPUS = "runs/corpus/python_sources.jsonl"
MINI_SIZES = ((64, 2), (96, 3), (128, 3), (192, 4), (256, 4), (320, 5))
MINI_TOKENS_PER_PARAM = (10, 20, 40)  # per non-embedding parameter (20: Chinchilla's budget)
MINI_LR_TOKENS_PER_PARAM = 20
MINI_LR = {"mmfree": 4e-3, "transformer": 1e-3}
MINI_LR_SIZE = (128, 3)
MICRO_SIZES = (16, 32, 64)
MICRO_LR = 1e-2
MICRO_LR_AXIS = (3e-3, 1e-2, 3e-2)
LR_FACTORS = (0.25, 0.5, 2.0, 4.0)


def _recipe(arch: str, lr: float) -> dict:
  """SPEC §3 schedules: mmfree cosine halved at the midpoint; T++ cosine to 0.1x."""
  if arch == "mmfree":
    return {"model.arch": arch, "optim.peak_lr": lr, "optim.schedule": "mmfree",
            "optim.min_lr_ratio": 0.0}
  return {"model.arch": arch, "optim.peak_lr": lr, "optim.schedule": "cosine",
          "optim.min_lr_ratio": 0.1}


def _apply(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    node = c
    for part in section.split("."):
      node = node[part]
    node[field] = value
  return c


# --- micro: CPU / tests -------------------------------------------------------------

def _micro_base() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.model.update(preset="micro", d_model=32, n_layers=2, dtype="float32", scan_chunk=16)
  c.model.head_dim = 16
  c.data.seq_len = 64
  c.train.update(batch_size=8, steps=32, log_every=2, eval_every=0, eval_batches=4,
                 checkpoint_every=16, keep_checkpoints=1, sample_tokens=0)
  c.optim.update(warmup_steps=3)
  return _apply(c, _recipe("mmfree", MICRO_LR))


def _micro(arch: str, d: int, lr: float = MICRO_LR) -> dict:
  name = f"{arch}-d{d}-L2" + ("" if lr == MICRO_LR else f"-lr{lr:g}")
  return {"name": name, **_recipe(arch, lr), "model.d_model": d}


def _micro_lr_points():
  return [_micro("mmfree", 32, lr) for lr in MICRO_LR_AXIS]


def _micro_points():
  return [_micro(a, d) for a in ("mmfree", "transformer") for d in MICRO_SIZES]


# --- mini: one H200 -----------------------------------------------------------------

MINI_BATCH, MINI_SEQ = 32, 512


def _mini_base() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.model.update(preset="tiny", d_model=128, n_layers=3, dtype="bfloat16", scan_chunk=64)
  c.model.head_dim = 32
  c.data.update(corpus=MINI_CORPUS, seq_len=MINI_SEQ)
  c.train.update(batch_size=MINI_BATCH, steps=1000, log_every=25, eval_every=0,
                 eval_batches=32, checkpoint_every=500, keep_checkpoints=1, sample_tokens=0)
  c.optim.update(warmup_frac=0.02)
  return _apply(c, _recipe("mmfree", MINI_LR["mmfree"]))


@functools.lru_cache(maxsize=None)
def mini_tokens(arch: str, d: int, n_layers: int, tokens_per_param: int) -> int:
  """Training tokens of a mini point: `tokens_per_param` per non-embedding param."""
  from mmfree_jax.config import ModelConfig  # noqa: PLC0415 (keeps config loading light)
  from mmfree_jax.models import param_counts  # noqa: PLC0415
  cfg = ModelConfig(arch=arch, d_model=d, n_layers=n_layers, head_dim=32)
  return tokens_per_param * param_counts(cfg)["non_embedding"]


def _mini(arch: str, d: int, n_layers: int, tokens_per_param: int,
          lr_factor: float = 1.0) -> dict:
  steps = max(1, round(mini_tokens(arch, d, n_layers, tokens_per_param)
                       / (MINI_BATCH * MINI_SEQ)))
  name = (f"{arch}-d{d}-L{n_layers}-tpp{tokens_per_param}"
          + ("" if lr_factor == 1.0 else f"-lrx{lr_factor:g}"))
  return {"name": name, **_recipe(arch, MINI_LR[arch] * lr_factor), "model.d_model": d,
          "model.n_layers": n_layers, "train.steps": steps,
          "train.checkpoint_every": max(1, steps // 4)}


def _mini_points():
  # Smallest compute first within each budget: a partial run still spans every size.
  return [_mini(a, d, n, t) for t in MINI_TOKENS_PER_PARAM for d, n in MINI_SIZES
          for a in ("mmfree", "transformer")]


def _mini_lr_points():
  d, n = MINI_LR_SIZE
  return [_mini(a, d, n, MINI_LR_TOKENS_PER_PARAM, f) for a in ("mmfree", "transformer")
          for f in (1.0, *LR_FACTORS)]


# --- paper: pods --------------------------------------------------------------------

def _paper_base() -> ml_collections.ConfigDict:
  return paper_exp.get_config("mmfree-370M")


def _paper_points():
  # experiments/paper.py owns these configs; a point is its difference from the base.
  ref = _flat(_paper_base())
  return [{"name": f"{a}-{s}", **{k: v for k, v in _flat(paper_exp.get_config(f"{a}-{s}")).items()
                                  if ref.get(k) != v}}
          for a in ("mmfree", "transformer") for s in ("370M", "1.3B", "2.7B")]


_POINTS = {"paper": _paper_points, "mini": _mini_points, "mini_lr": _mini_lr_points,
           "micro": _micro_points, "micro_lr": _micro_lr_points}
_BASES = {"paper": _paper_base, "mini": _mini_base, "mini_lr": _mini_base,
          "micro": _micro_base, "micro_lr": _micro_base}


def _check(name: str):
  if name not in _POINTS:
    raise ValueError(f"unknown sweep {name!r}; use one of {SWEEPS}")


def _flat(c: ml_collections.ConfigDict, prefix: str = "") -> dict:
  out = {}
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def get_sweep(name: str) -> list[dict]:
  """The points of sweep `name` as override dicts `{"name": ..., "<section>.<key>": value}`
  relative to `get_config(name)`, duplicates dropped."""
  _check(name)
  seen: dict[str, dict] = {}
  for o in _POINTS[name]():
    seen.setdefault(o["name"], o)
  return list(seen.values())


def points(name: str) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(point name, full config) of every point of sweep `name`."""
  return [(o["name"], _apply(_BASES[name](), {k: v for k, v in o.items() if k != "name"}))
          for o in get_sweep(name)]


def get_config(arg: str = "micro") -> ml_collections.ConfigDict:
  """`<sweep>` -> that sweep's base config; `<sweep>/<point>` -> one point's config."""
  name, _, point = str(arg).partition("/")
  _check(name)
  if not point:
    return _BASES[name]()
  pts = dict(points(name))
  if point not in pts:
    raise ValueError(f"sweep {name!r} has no point {point!r}; points: {sorted(pts)}")
  return pts[point]
