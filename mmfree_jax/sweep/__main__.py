"""Run a sweep's points one after another (resumable), or print one launch command each."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Sequence

from mmfree_jax import cli
from mmfree_jax.sweep.plan import format_plan, plan
from mmfree_jax.sweep.runner import command, run_sweep
from mmfree_jax.sweep.spec import SweepError, load_sweep, parse_sets, point_config, select

_HELP = """\
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


def main(argv: Sequence[str] | None = None) -> int:
  ap = cli.ArgumentParser(prog="python -m mmfree_jax.sweep", description=__doc__,
                          epilog=_HELP)
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
    return cli.BAD_INPUT
  table = os.path.join(os.path.abspath(args.workdir), "results.csv")
  print(f"{len(rows)} finished point(s): {table}")
  return 0


if __name__ == "__main__":
  cli.run(main)
