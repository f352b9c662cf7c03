"""SLURM GPU clusters: writes an sbatch script (one process per GPU by default) and submits it.

    python -m launch.slurm --nodes=4 --gpus_per_node=8 --partition=gpu --time=48:00:00 \
        --config=experiments/paper.py:mmfree-1.3B --workdir=/shared/runs/mmfree-13b \
        --dry-run -- --config.data.corpus=/shared/slimpajama/*.jsonl

The script exports JAX_COORDINATOR_ADDRESS (the job's first node, from `scontrol show
hostnames`) and JAX_NUM_PROCESSES; `srun` starts the tasks and each sets
JAX_PROCESS_ID=$SLURM_PROCID and JAX_LOCAL_DEVICE_IDS (its GPU: $SLURM_LOCALID, or all
of the node's GPUs with --process_per_node). `#SBATCH --signal=TERM@N` asks SLURM to
send SIGTERM N seconds before the time limit: the trainer checkpoints and exits 0, and
`--requeue` (or resubmitting) resumes. `--dry-run` prints the script and the sbatch line.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags

from launch import common

_NODES = flags.DEFINE_integer("nodes", 1, "Nodes.")
_GPUS = flags.DEFINE_integer("gpus_per_node", 8, "GPUs per node.")
_PER_NODE = flags.DEFINE_bool("process_per_node", False, "One process per node driving all its "
                              "GPUs (default: one process per GPU).")
_PARTITION = flags.DEFINE_string("partition", "", "SLURM partition.")
_ACCOUNT = flags.DEFINE_string("account", "", "SLURM account.")
_TIME = flags.DEFINE_string("time", "24:00:00", "Time limit (HH:MM:SS or D-HH:MM:SS).")
_JOB = flags.DEFINE_string("job_name", "mmfree", "Job name.")
_CPUS = flags.DEFINE_integer("cpus_per_task", 0, "CPUs per task (0 = SLURM's default).")
_PORT = flags.DEFINE_integer("port", 12355, "Coordinator port on the first node.")
_SIGNAL = flags.DEFINE_integer("signal_seconds", 300, "SIGTERM this long before the time limit.")
_REQUEUE = flags.DEFINE_bool("requeue", False, "Requeue on preemption / node failure.")
_SETUP = flags.DEFINE_string("setup", "source .venv/bin/activate", "Shell line run before training.")
_MEM_FRACTION = flags.DEFINE_float("mem_fraction", 0.9, "XLA_PYTHON_CLIENT_MEM_FRACTION.")
_CONFIG = flags.DEFINE_string("config", "experiments/paper.py:mmfree-1.3B", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Run directory on a filesystem all nodes share.")
_SCRIPT = flags.DEFINE_string("script", "", "Where to write the script (default <job_name>.sbatch).")
_DRY_RUN = flags.DEFINE_bool("dry-run", False, "Print the script and the sbatch line; submit nothing.")


def script(*, nodes: int, gpus_per_node: int, process_per_node: bool, partition: str,
           account: str, time: str, job_name: str, cpus_per_task: int, port: int,
           signal_seconds: int, requeue: bool, setup: str, mem_fraction: float, config: str,
           workdir: str, extra: list[str]) -> str:
  """The sbatch script's text."""
  if nodes < 1 or gpus_per_node < 1:
    raise common.LaunchError(f"--nodes={nodes} and --gpus_per_node={gpus_per_node} must be >= 1")
  if not workdir:
    raise common.LaunchError("--workdir is required (a path every node sees, or gs://...)")
  if not re.fullmatch(r"(\d+-)?\d+(:\d\d){0,2}", time):
    raise common.LaunchError(f"--time={time!r} is not a SLURM time (HH:MM:SS or D-HH:MM:SS)")
  if not 0 < mem_fraction <= 1:
    raise common.LaunchError(f"--mem_fraction={mem_fraction} must be in (0, 1]")
  tasks = 1 if process_per_node else gpus_per_node
  devices = ",".join(map(str, range(gpus_per_node))) if process_per_node else "$SLURM_LOCALID"
  sb = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={tasks}",
        f"--gpus-per-node={gpus_per_node}", f"--time={time}", "--output=%x-%j.out"]
  sb += [f"--partition={partition}"] * bool(partition) + [f"--account={account}"] * bool(account)
  sb += [f"--cpus-per-task={cpus_per_task}"] * bool(cpus_per_task)
  sb += [f"--signal=TERM@{signal_seconds}"] * bool(signal_seconds) + ["--requeue"] * requeue
  train = common.join(common.train_args(config, workdir, extra))
  task = f"JAX_PROCESS_ID=$SLURM_PROCID JAX_LOCAL_DEVICE_IDS={devices} exec {train}"
  lines = ["#!/bin/bash", *(f"#SBATCH {s}" for s in sb), "set -eo pipefail"]
  lines += [setup] * bool(setup.strip())
  lines += [
      'head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
      f'export JAX_COORDINATOR_ADDRESS="$head_node:{port}"',
      f"export JAX_NUM_PROCESSES={nodes * tasks}",
      f"export XLA_PYTHON_CLIENT_MEM_FRACTION={mem_fraction:g}",
      f"srun --kill-on-bad-exit=1 bash -c {common.join([task])}",
  ]
  return "\n".join(lines) + "\n"


def main(argv):
  path = _SCRIPT.value or f"{_JOB.value}.sbatch"
  try:
    text = script(nodes=_NODES.value, gpus_per_node=_GPUS.value, process_per_node=_PER_NODE.value,
                  partition=_PARTITION.value, account=_ACCOUNT.value, time=_TIME.value,
                  job_name=_JOB.value, cpus_per_task=_CPUS.value, port=_PORT.value,
                  signal_seconds=_SIGNAL.value, requeue=_REQUEUE.value, setup=_SETUP.value,
                  mem_fraction=_MEM_FRACTION.value, config=_CONFIG.value, workdir=_WORKDIR.value,
                  extra=list(argv[1:]))
  except common.LaunchError as e:
    common.fail(str(e))
  submit = common.join(["sbatch", path])
  if _DRY_RUN.value:
    print(f"cat > {common.join([path])} <<'EOF'\n{text}EOF")
    print(submit)
    return
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)
  print(f"wrote {path}", file=sys.stderr)
  sys.exit(common.run_lines([submit], dry_run=False))


if __name__ == "__main__":
  app.run(main)
