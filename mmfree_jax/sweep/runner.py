"""Runs a sweep's points (resumable, `jobs` at a time, one subprocess each) and builds each
point's train command."""

from __future__ import annotations

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
from mmfree_jax.scaling import results as res_lib
from mmfree_jax.sweep.plan import plan
from mmfree_jax.sweep.spec import Sweep, SweepError, load_sweep, parse_sets, point_config, select


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


def is_finished(point_dir: str, config: ml_collections.ConfigDict) -> bool:
  """True when `summary.json` records the configured number of steps and tokens."""
  s = res_lib.read_json(os.path.join(point_dir, "summary.json"))
  if not s:
    return False
  want = config.train.steps * config.train.batch_size * config.data.seq_len
  return s.get("steps") == config.train.steps and s.get("tokens_seen") == want


def _record(point_dir: str, **update):
  path = os.path.join(point_dir, res_lib.POINT_FILE)
  rec = res_lib.read_json(path) or {"wall_s": 0.0, "runs": 0}
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
  from mmfree_jax.train import setup  # noqa: PLC0415 (jax only once the sweep runs)
  for c in {res_lib.corpus_key(configs[n]): configs[n] for n in todo}.values():
    bar.write(f"corpus {c.data.corpus}: preparing (once; later points reuse it)")
    setup.corpus_train_tokens(c, build=True)
  running: dict[str, tuple[subprocess.Popen | None, float]] = {}
  show()

  def finish(name: str, rc: int, t0: float):
    pdir = os.path.join(workdir, name)
    prev = res_lib.read_json(os.path.join(pdir, res_lib.POINT_FILE)) or {}
    rec = _record(pdir, add_wall_s=time.time() - t0, runs=prev.get("runs", 0) + 1)
    done.append(name)
    show()
    bar.update(flops[name])
    if fwd.stop:
      bar.write(f"{name}: stopped by SIGTERM (checkpointed); rerun to resume")
    elif rc != 0 or not is_finished(pdir, configs[name]):
      failed.append(name)
      bar.write(f"{name}: FAILED (exit {rc}); see {os.path.join(pdir, 'train.log')}")
    else:
      s = res_lib.read_json(os.path.join(pdir, "summary.json")) or {}
      bar.write(f"{name}: held-out loss {s.get('eval_loss', float('nan')):.4f} "
                f"in {rec['wall_s']:.0f}s")
      res_lib.write_results(workdir)

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
  rows = res_lib.write_results(workdir)
  if failed:
    raise SweepError(f"{len(failed)} point(s) failed: {', '.join(failed)}; their train.log "
                     "says why; rerun to retry")
  return rows
