"""Run a sweep's points one after another (resumable), or print one launch command each.

    python -m mmfree_jax.sweep --sweep=experiments/sweeps.py:micro --workdir=runs/micro
    python -m mmfree_jax.sweep --sweep=experiments/sweeps.py:paper --workdir=/mnt/BUCKET/paper \\
        --print_commands --set=data.corpus=/data/slimpajama/*.jsonl.zst \\
        [--launcher="python -m launch.tpu_vm --name=mm-{slug} --accelerator_type=v5p-32"]
    flags: --points=a,b,mmfree-* (subset by name or glob)  --set=key=value (every point,
           repeatable)  --plan (sizes, tokens, FLOPs, planned H200 time; runs nothing)
           --jobs=N (N points at once: CPU cores, or small points sharing one GPU, each
           given 0.9/N of its memory)  --inprocess (no subprocess per point)

A sweep file defines `get_config(name)` (the sweep's base config) and `get_sweep(name)`
(a list of `{"name": ..., "section.key": value}` overrides), see experiments/sweeps.py.
Point `p` trains in `<workdir>/<p>/` with exactly the command `--print_commands` shows:

    python -m mmfree_jax.train --config=<file>:<sweep> --config.<key>=<value>... \\
        --workdir=<workdir>/<p>

Each point runs in its own subprocess: the process exits and frees all host and device
memory (JAX keeps compiled executables and buffers alive), a point that crashes or runs
out of memory does not take the sweep down, and what runs locally is byte for byte the
command a cluster would run. The cost is ~2 s of start-up per point. Points share a
persistent XLA compilation cache (`<workdir>/jax_cache`, or $JAX_COMPILATION_CACHE_DIR):
a resumed point does not recompile.

Resumable: a point whose `summary.json` matches its configured steps is skipped; an
interrupted point resumes from its last checkpoint (the trainer resumes by itself).
SIGTERM is forwarded to the running point (it checkpoints and exits), then the sweep stops.
Output: `<workdir>/results.csv` and `results.jsonl`, one row per finished point found in
`<workdir>`; each point directory also holds `train.log` and `sweep_point.json`
(wall time summed over attempts, attempt count, command).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Sequence

import ml_collections

from mmfree_jax import cli

POINT_FILE = "sweep_point.json"
COLUMNS = ("name", "arch", "d_model", "n_layers", "d_ff", "seq_len", "batch_size", "steps",
           "peak_lr", "schedule", "params", "non_embedding_params", "flops_params", "tokens",
           "flops", "tokens_per_param", "epochs", "final_loss", "eval_loss",
           "unigram_xent_validation", "wall_s", "runs")


class SweepError(ValueError):
  """A bad sweep spec, point selection or override; the message says how to fix it."""


@dataclasses.dataclass
class Sweep:
  file: str           # absolute path of the sweep file
  name: str           # the sweep's name inside the file
  base: ml_collections.ConfigDict
  points: list[tuple[str, dict[str, Any]]]  # (point name, overrides)

  @property
  def spec(self) -> str:
    return f"{self.file}:{self.name}"


def _import_file(path: str):
  cli.import_root(path)  # so `from experiments import base` works
  mod_name = "_sweep_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(mod_name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load_sweep(spec: str) -> Sweep:
  """`path/to/file.py:name` -> Sweep (SweepError with a one-line message if bad)."""
  path, sep, name = str(spec).rpartition(":")
  if not sep or not path or not name:
    raise SweepError(f"--sweep={spec!r} must look like experiments/sweeps.py:<name>")
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise SweepError(f"sweep file {path!r} does not exist")
  mod = _import_file(path)
  if not hasattr(mod, "get_sweep") or not hasattr(mod, "get_config"):
    raise SweepError(f"{path} must define get_config(name) and get_sweep(name)")
  try:
    overrides = mod.get_sweep(name)
    base = mod.get_config(name)
  except (ValueError, KeyError) as e:
    raise SweepError(f"{path}:{name}: {e}") from None
  points, seen = [], set()
  for i, o in enumerate(overrides):
    o = dict(o)
    pname = str(o.pop("name", "") or _auto_name(o) or f"point{i}")
    if pname in seen:
      raise SweepError(f"sweep {name!r} has two points named {pname!r}")
    if os.sep in pname or pname.startswith("."):
      raise SweepError(f"point name {pname!r} must be a plain directory name")
    seen.add(pname)
    points.append((pname, o))
  sw = Sweep(path, name, base, points)
  for pname, o in points:  # every override must name an existing key
    point_config(sw, pname, o)
  return sw


def _auto_name(o: dict[str, Any]) -> str:
  return "-".join(f"{k.split('.')[-1]}{v}" for k, v in sorted(o.items()))


def parse_sets(sets: Sequence[str]) -> dict[str, Any]:
  """`["train.steps=8", "data.corpus=a.txt"]` -> {"train.steps": 8, "data.corpus": "a.txt"}."""
  out = {}
  for s in sets or ():
    key, eq, val = str(s).partition("=")
    if not eq or "." not in key:
      raise SweepError(f"--set={s!r} must look like section.key=value (e.g. train.steps=100)")
    try:
      out[key.strip()] = ast.literal_eval(val)
    except (ValueError, SyntaxError):
      out[key.strip()] = val
  return out


def _apply(c: ml_collections.ConfigDict, overrides: dict[str, Any], what: str):
  for key, val in overrides.items():
    node, parts = c, key.split(".")
    for p in parts[:-1]:
      if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
        raise SweepError(f"{what}: config has no section {key.rsplit('.', 1)[0]!r}")
      node = node[p]
    if parts[-1] not in node:
      raise SweepError(f"{what}: config has no key {key!r}")
    old = node[parts[-1]]
    if isinstance(old, float) and isinstance(val, int) and not isinstance(val, bool):
      val = float(val)
    if isinstance(old, str) and not isinstance(val, str):
      val = str(val)
    try:
      node[parts[-1]] = val
    except TypeError:
      raise SweepError(f"{what}: {key}={val!r} has the wrong type (the config holds "
                       f"{type(old).__name__})") from None


def point_config(sw: Sweep, name: str, overrides: dict[str, Any] | None = None,
                 sets: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The full config of point `name`: base + its overrides + `sets`."""
  if overrides is None:
    overrides = dict(sw.points)[name]
  c = ml_collections.ConfigDict(sw.base.to_dict())
  _apply(c, overrides, f"point {name!r}")
  _apply(c, sets or {}, "--set")
  return c


def select(sw: Sweep, patterns: str | Sequence[str] | None) -> list[str]:
  """Point names matching comma-separated names or globs (all when empty)."""
  names = [n for n, _ in sw.points]
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",")]
  patterns = [p.strip() for p in patterns or () if p.strip()]
  if not patterns:
    return names
  out = []
  for p in patterns:
    hit = [n for n in names if fnmatch.fnmatchcase(n, p)]
    if not hit:
      raise SweepError(f"--points: {p!r} matches no point of {sw.name!r}; points: {names}")
    out += [n for n in hit if n not in out]
  return [n for n in names if n in out]


def _flag_value(v: Any) -> str:
  if isinstance(v, (bool, int, float, str)):
    return str(v) if not isinstance(v, float) else repr(v)
  raise SweepError(f"override value {v!r} is not a scalar; only bool/int/float/str can be "
                   "passed as --config.<key>=<value>")


def _abs(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def command(sw: Sweep, name: str, workdir: str, sets: dict[str, Any] | None = None,
            python: str = sys.executable, relative: bool = False,
            launcher: str | None = None) -> list[str]:
  """The train command of one point (argv list); `relative`: paths as given / relative to
  the current directory (for printing). `launcher`: a launch/ command template (with
  optional {name} / {slug} fields) that takes --config and --workdir and passes the
  arguments after `--` to the trainer."""
  overrides = {**dict(sw.points)[name], **(sets or {})}
  file = os.path.relpath(sw.file) if relative else sw.file
  wd = workdir if relative else _abs(workdir)
  config = f"--config={file}:{sw.name}"
  work = f"--workdir={wd.rstrip('/')}/{name}"
  extra = [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()]
  if launcher:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return [*shlex.split(launcher.format(name=name, slug=slug)), config, work, "--", *extra]
  return [python, "-m", "mmfree_jax.train", config, *extra, work]


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def is_finished(point_dir: str, config: ml_collections.ConfigDict) -> bool:
  """True when `summary.json` records the configured number of steps and tokens."""
  s = _read_json(os.path.join(point_dir, "summary.json"))
  if not s:
    return False
  want = config.train.steps * config.train.batch_size * config.data.seq_len
  return s.get("steps") == config.train.steps and s.get("tokens_seen") == want


def _record(point_dir: str, **update):
  path = os.path.join(point_dir, POINT_FILE)
  rec = _read_json(path) or {"wall_s": 0.0, "runs": 0}
  wall = update.pop("add_wall_s", 0.0)
  rec["wall_s"] = rec.get("wall_s", 0.0) + wall
  rec.update(update)
  os.makedirs(point_dir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(rec, f, indent=2)
  os.replace(path + ".tmp", path)
  return rec


class _Forward:
  """SIGTERM -> forward to the running points (they checkpoint and exit), then stop."""

  def __init__(self):
    self.procs: set[subprocess.Popen] = set()
    self.stop = False
    self._prev = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.stop = True
    for p in list(self.procs):
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)

  def restore(self):
    signal.signal(signal.SIGTERM, self._prev)


def _child_env(root: str, workdir: str, jobs: int, extra: dict[str, str] | None = None,
               base: dict[str, str] | None = None) -> dict[str, str]:
  env = {**(os.environ if base is None else base), **(extra or {})}
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
  env.setdefault("PYTHONUNBUFFERED", "1")
  # Persistent XLA cache: a resumed point, or a point whose program another point already
  # compiled, starts without recompiling.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, "jax_cache"))
  if jobs > 1:  # points sharing one accelerator split its memory
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / jobs:.2f}")
  return env


def _start(args: list[str], log_path: str, env: dict[str, str], root: str) -> subprocess.Popen:
  with open(log_path, "a") as log:
    log.write(f"\n$ {shlex.join(args)}\n")
    log.flush()
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)


def _run_inprocess(config: ml_collections.ConfigDict, point_dir: str, log_path: str) -> int:
  from mmfree_jax.train import loop  # noqa: PLC0415
  try:
    loop.run(config, point_dir)  # a preempted run writes no summary.json: seen as unfinished
  except (loop.ConfigError, loop.TrainingAborted) as e:
    with open(log_path, "a") as f:
      f.write(f"error: {e}\n")
    return 1
  return 0


def run_sweep(spec: str | Sweep, workdir: str, points: str | Sequence[str] | None = None,
              sets: Sequence[str] | dict[str, Any] = (), inprocess: bool = False,
              jobs: int = 1, progress: bool = True, env: dict[str, str] | None = None,
              base_env: dict[str, str] | None = None) -> list[dict[str, Any]]:
  """Runs the selected unfinished points (`jobs` at a time, in order); returns the rows.

  Point subprocesses get `base_env` (default: this process's environment) plus `env`.

  Raises SweepError if a point failed (after running the others).
  """
  sw = spec if isinstance(spec, Sweep) else load_sweep(spec)
  sets = sets if isinstance(sets, dict) else parse_sets(sets)
  if jobs < 1 or (inprocess and jobs > 1):
    raise SweepError(f"--jobs={jobs} must be >= 1 (and 1 with --inprocess)")
  workdir = os.path.abspath(workdir)
  names = select(sw, points)
  configs = {n: point_config(sw, n, sets=sets) for n in names}
  root = cli.import_root(sw.file)
  os.makedirs(workdir, exist_ok=True)
  env = _child_env(root, workdir, jobs, env, base_env)
  failed, fwd = [], _Forward()
  done = [n for n in names if is_finished(os.path.join(workdir, n), configs[n])]
  todo = [n for n in names if n not in done]
  # Progress in planned FLOPs, so that the one ETA (tqdm's) weighs points by their cost.
  flops = {r["name"]: r["flops"] for r in plan(sw, names, sets, corpus_tokens=0.0)}
  bar = cli.progress_bar(total=sum(flops.values()), initial=sum(flops[n] for n in done),
                         disable=not progress,
                         bar_format="{l_bar}{bar}| [{elapsed}<{remaining}]")

  def show():
    bar.set_description_str(f"{len(done)}/{len(names)} points" +
                            (f", running {','.join(running)}" if running else ""), refresh=False)

  for name in done:
    bar.write(f"{name}: finished, skipped")
  # Each corpus is tokenized once, here, before points that share it start together.
  for c in {_corpus_key(configs[n]): configs[n] for n in todo}.values():
    bar.write(f"corpus {c.data.corpus}: preparing (once; later points reuse it)")
    _corpus_train_tokens(c, build=True)
  running: dict[str, tuple[subprocess.Popen | None, float]] = {}
  show()

  def finish(name: str, rc: int, t0: float):
    pdir = os.path.join(workdir, name)
    rec = _record(pdir, add_wall_s=time.time() - t0,
                  runs=(_read_json(os.path.join(pdir, POINT_FILE)) or {}).get("runs", 0) + 1)
    done.append(name)
    show()
    bar.update(flops[name])
    if fwd.stop:
      bar.write(f"{name}: stopped by SIGTERM (checkpointed); rerun to resume")
    elif rc != 0 or not is_finished(pdir, configs[name]):
      failed.append(name)
      bar.write(f"{name}: FAILED (exit {rc}); see {os.path.join(pdir, 'train.log')}")
    else:
      s = _read_json(os.path.join(pdir, "summary.json")) or {}
      bar.write(f"{name}: held-out loss {s.get('eval_loss', float('nan')):.4f} "
                f"in {rec['wall_s']:.0f}s")
      write_results(workdir)

  try:
    while (todo or running) and not (fwd.stop and not running):
      while todo and len(running) < jobs and not fwd.stop:
        name = todo.pop(0)
        pdir = os.path.join(workdir, name)
        args = command(sw, name, workdir, sets)
        _record(pdir, command=shlex.join(args), sweep=sw.spec)
        log = os.path.join(pdir, "train.log")
        t0 = time.time()
        if inprocess:
          finish(name, _run_inprocess(configs[name], pdir, log), t0)
          continue
        proc = _start(args, log, env, root)
        fwd.procs.add(proc)
        running[name] = (proc, t0)
        show()
      for name, (proc, t0) in list(running.items()):
        if proc.poll() is not None:
          fwd.procs.discard(proc)
          del running[name]
          finish(name, proc.returncode, t0)
      if running:
        time.sleep(0.2)
  finally:
    for proc, _ in running.values():  # only reached on an exception in this process
      proc.terminate()
    bar.close()
    fwd.restore()
  rows = write_results(workdir)
  if failed:
    raise SweepError(f"{len(failed)} point(s) failed: {', '.join(failed)}; their train.log "
                     "says why; rerun to retry")
  return rows


def _corpus_key(config: ml_collections.ConfigDict) -> tuple:
  return (config.data.corpus, config.data.data_dir, config.data.tokenizer, config.data.text_field)


def _corpus_train_tokens(config: ml_collections.ConfigDict, build: bool) -> float | None:
  """Tokens of the corpus's train split (None if unknown and `build` is False)."""
  from mmfree_jax.data import builder as data_builder  # noqa: PLC0415
  from mmfree_jax.train import loop  # noqa: PLC0415
  try:
    cfg = loop.model_config(config)
    if not build:
      data_dir = config.data.data_dir or os.path.expanduser("~/.cache/mmfree_jax/data")
      b = data_builder.MmfreeText(
          data_dir=data_dir, config=data_builder.make_config(
              loop._sources(config.data.corpus), config.data.tokenizer or None,  # noqa: SLF001
              text_field=config.data.text_field), file_format="array_record")
      if not os.path.exists(os.path.join(os.fspath(b.data_dir), "dataset_info.json")):
        return None
    info = loop.prepare_data(config, cfg)
    return float(data_builder.corpus_stats(info)["train"]["tokens"])
  except Exception:  # noqa: BLE001 - unknown corpus size only blanks the epochs column
    return None


def point_row(point_dir: str, corpus_tokens: dict | None = None) -> dict[str, Any] | None:
  """One results row from a finished point directory (None if not finished)."""
  s = _read_json(os.path.join(point_dir, "summary.json"))
  cj = _read_json(os.path.join(point_dir, "config.json"))
  if not s or not cj:
    return None
  from mmfree_jax.train import loop  # noqa: PLC0415
  config = ml_collections.ConfigDict(cj)
  cfg = loop.model_config(config)
  tokens = float(s["tokens_seen"])
  key = _corpus_key(config)
  cache = corpus_tokens if corpus_tokens is not None else {}
  if key not in cache:
    cache[key] = _corpus_train_tokens(config, build=True)
  ctok = cache[key]
  rec = _read_json(os.path.join(point_dir, POINT_FILE)) or {}
  ne = int(s["non_embedding_params"])
  return {
      "name": os.path.basename(point_dir), "arch": cfg.arch, "d_model": cfg.d_model,
      "n_layers": cfg.n_layers, "d_ff": cfg.ffn, "seq_len": config.data.seq_len,
      "batch_size": config.train.batch_size, "steps": int(s["steps"]),
      "peak_lr": config.optim.peak_lr, "schedule": config.optim.schedule,
      "params": int(s["params"]), "non_embedding_params": ne,
      # N of 6ND (scaling.flops.flops_params), without re-tracing the model here.
      "flops_params": int(s["params"]) - cfg.vocab_size * cfg.d_model,
      "tokens": tokens, "flops": float(s["flops"]),
      "tokens_per_param": tokens / ne, "epochs": tokens / ctok if ctok else None,
      "final_loss": s.get("final_loss"), "eval_loss": s.get("eval_loss"),
      "unigram_xent_validation": s.get("unigram_xent_validation"),
      "wall_s": rec.get("wall_s"), "runs": rec.get("runs"),
  }


def collect(workdir: str) -> list[dict[str, Any]]:
  """Rows of every finished point directory under `workdir`, sorted by arch, size, lr."""
  rows, cache = [], {}
  for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else ():
    row = point_row(os.path.join(workdir, name), cache)
    if row is not None:
      rows.append(row)
  return sorted(rows, key=lambda r: (r["arch"], r["flops"], r["peak_lr"], r["name"]))


def write_results(workdir: str) -> list[dict[str, Any]]:
  """Writes `<workdir>/results.csv` and `results.jsonl`; returns the rows."""
  rows = collect(workdir)
  with open(os.path.join(workdir, "results.csv.tmp"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    for r in rows:
      w.writerow({k: "" if r.get(k) is None else r[k] for k in COLUMNS})
  os.replace(os.path.join(workdir, "results.csv.tmp"), os.path.join(workdir, "results.csv"))
  with open(os.path.join(workdir, "results.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return rows


def plan(sw: Sweep, names: Sequence[str], sets: dict[str, Any] | None = None,
         corpus_tokens: float | None = None, peak_flops: float = 989e12) -> list[dict[str, Any]]:
  """Per point: sizes, tokens, FLOPs, tokens/param, epochs and planned single-H200 time.
  `corpus_tokens`: the corpus' train-split tokens (None: read the prepared corpus; 0: unknown)."""
  from mmfree_jax.models import param_counts  # noqa: PLC0415
  from mmfree_jax.scaling import flops as flops_lib  # noqa: PLC0415
  from mmfree_jax.train import loop  # noqa: PLC0415
  rows = []
  for n in names:
    c = point_config(sw, n, sets=sets)
    cfg = loop.model_config(c).replace(attention_impl="xla")  # counting compiles no kernel
    counts = param_counts(cfg)
    tokens = float(c.train.steps * c.train.batch_size * c.data.seq_len)
    ctok = corpus_tokens if corpus_tokens is not None else _corpus_train_tokens(c, build=False)
    rows.append({
        "name": n, "params": counts["total"], "non_embedding_params": counts["non_embedding"],
        "tokens": tokens, "flops": flops_lib.train_flops(cfg, c.data.seq_len, tokens),
        "tokens_per_param": tokens / counts["non_embedding"],
        "epochs": tokens / ctok if ctok else None, "steps": c.train.steps,
        "planned_s": flops_lib.estimate_train_seconds(cfg, c.data.seq_len, tokens, peak_flops),
    })
  return rows


def _si(x: float) -> str:
  for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= div:
      return f"{x / div:.3g}{suffix}"
  return f"{x:.3g}"


def _duration(s: float) -> str:
  if s < 2 * 3600:
    return f"{s / 60:.1f} min"
  return f"{s / 3600:.1f} h" if s < 2 * 86400 else f"{s / 86400:.1f} days"


def format_plan(rows: list[dict[str, Any]]) -> str:
  head = ("point", "params", "non-emb", "tokens", "FLOPs", "tok/param", "epochs", "steps",
          "planned")
  lines = [head]
  for r in rows:
    ep = "?" if r["epochs"] is None else f"{r['epochs']:.2f}"
    lines.append((r["name"], _si(r["params"]), _si(r["non_embedding_params"]), _si(r["tokens"]),
                  f"{r['flops']:.2e}", f"{r['tokens_per_param']:.2f}",
                  ep, str(r["steps"]), _duration(r["planned_s"])))
  tot = sum(r["planned_s"] for r in rows)
  w = [max(len(l[i]) for l in lines) for i in range(len(head))]
  out = ["  ".join(v.rjust(w[i]) for i, v in enumerate(l)) for l in lines]
  return "\n".join(out + [f"total planned: {_duration(tot)} on one H200 (an estimate: "
                          "mmfree_jax.scaling.flops.planned_mfu)"])


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # noqa: PLC0415
  ap = argparse.ArgumentParser(prog="python -m mmfree_jax.sweep", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sweep", required=True, help="experiments/sweeps.py:<name>")
  ap.add_argument("--workdir", help="one directory per point below it")
  ap.add_argument("--points", default="", help="comma-separated names or globs")
  ap.add_argument("--set", action="append", default=[], dest="sets",
                  help="section.key=value applied to every point (repeatable)")
  ap.add_argument("--print_commands", "--print-commands", action="store_true")
  ap.add_argument("--launcher", default="", help="with --print_commands: a launcher command "
                  "template, e.g. 'python -m launch.tpu_vm --name=mm-{slug} --zone=Z "
                  "--accelerator_type=v5p-32' (gets --config, --workdir, then -- overrides)")
  ap.add_argument("--plan", action="store_true", help="print the plan table; run nothing")
  ap.add_argument("--corpus_tokens", type=float, default=None,
                  help="train-split tokens for --plan's epochs (default: the prepared corpus)")
  ap.add_argument("--inprocess", action="store_true", help="run points in this process")
  ap.add_argument("--jobs", type=int, default=1,
                  help="points run at once (CPU cores; several small points on one GPU)")
  args = ap.parse_args(argv)
  # This process only plans and tabulates (unless --inprocess); it must not hold accelerator
  # memory that the point subprocesses need: it pins JAX to the CPU, they get the original env.
  cli.quiet_output()
  child_base = dict(os.environ)
  if not args.inprocess:
    os.environ["JAX_PLATFORMS"] = "cpu"
  try:
    sw = load_sweep(args.sweep)
    sets = parse_sets(args.sets)
    names = select(sw, args.points)
    for n in names:
      point_config(sw, n, sets=sets)
    if args.plan:
      print(format_plan(plan(sw, names, sets, args.corpus_tokens)))
      return 0
    if not args.workdir:
      raise SweepError("--workdir is required (one directory per point below it)")
    if args.print_commands:
      for n in names:
        print(shlex.join(command(sw, n, args.workdir, sets, python="python", relative=True,
                                 launcher=args.launcher or None)))
      return 0
    rows = run_sweep(sw, args.workdir, names, sets, inprocess=args.inprocess,
                     jobs=args.jobs, base_env=child_base)
  except SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  table = os.path.join(os.path.abspath(args.workdir), "results.csv")
  print(f"{len(rows)} finished point(s): {table}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
