"""Cloud TPU VM slices (one or several): create, copy the code, install, train, logs, delete.

    python -m launch.tpu_vm --name=mmfree-13b --zone=us-east5-a --accelerator_type=v5p-32 \
        --config=experiments/paper.py:mmfree-1.3B --workdir=gs://BUCKET/runs/mmfree-13b \
        --spot --dry-run -- --config.data.corpus=/data/slimpajama/*.jsonl
    python -m launch.tpu_vm --name=... --num_slices=2 ...     # multi-slice (queued resources)
    python -m launch.tpu_vm --name=... --actions=delete        # teardown

`--actions` (comma-separated, in this order): create, copy, setup, train, logs, delete.
One slice uses `gcloud compute tpus tpu-vm create`; `--num_slices > 1` (or `--queued`)
a queued resource with `--node-count` whose nodes are `<name>-0`, `<name>-1`, ...; the
TPU runtime sets the MEGASCALE_* variables, `jax.distributed.initialize()` reads them,
and the trainer's mesh puts `data` across slices (`mmfree_jax.multihost.make_mesh`).
`train` starts the trainer detached on every worker (`MMFREE_DISTRIBUTED=1`, output in
`~/mmfree_train.log`); `logs` follows worker 0's log. `--dry-run` prints the commands.
"""

from __future__ import annotations

import re
import sys

from absl import app, flags

from launch import common

_NAME = flags.DEFINE_string("name", "", "TPU VM (or queued resource) name.")
_ZONE = flags.DEFINE_string("zone", "", "Zone, e.g. us-east5-a (v5p), us-west4-a (v5e).")
_PROJECT = flags.DEFINE_string("project", "", "GCP project (default: gcloud's).")
_ACCEL = flags.DEFINE_string("accelerator_type", "v5p-32", "v5p-32, v5litepod-16 (v5e-16), v6e-256, v4-64.")
_VERSION = flags.DEFINE_string("version", "", "TPU software version (default per generation).")
_SPOT = flags.DEFINE_bool("spot", False, "Spot capacity (preemptible: the trainer checkpoints on SIGTERM).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices (> 1: queued resource, --node-count).")
_QUEUED = flags.DEFINE_bool("queued", False, "Use a queued resource even for one slice.")
_REPO = flags.DEFINE_string("repo", "", "git URL to clone on the workers (default: scp this tree).")
_BRANCH = flags.DEFINE_string("branch", "main", "Branch to clone with --repo.")
_CONFIG = flags.DEFINE_string("config", "experiments/paper.py:mmfree-1.3B", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Run directory; gs://... so all workers share it.")
_MOUNT = flags.DEFINE_string("mount_bucket", "", "setup: gcsfuse-mount gs://BUCKET at /mnt/BUCKET "
                             "on every worker (a shared POSIX workdir: --workdir=/mnt/BUCKET/...).")
_JAX_TPU = flags.DEFINE_string("jax_tpu", "jax[tpu]==0.10.2", "pip requirement bringing libtpu.")
_ACTIONS = flags.DEFINE_string("actions", "create,copy,setup,train,logs", "Steps to run, in order.")
_DRY_RUN = flags.DEFINE_bool("dry-run", False, "Print the commands instead of running them.")

ACTIONS = ("create", "copy", "setup", "train", "logs", "delete")
# Default TPU VM software versions per generation (Cloud TPU docs).
RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
           "v6e": "v2-alpha-tpuv6e"}
CODE_DIR = "~/mmfree_jax"
LOG = "~/mmfree_train.log"
TARBALL = "/tmp/mmfree_jax_code.tgz"


MEGASCALE_PORT = 8080
_COORD = "@COORDINATOR@"


def _dq(s: str) -> str:
  """Escapes `s` for the inside of a double-quoted shell word."""
  for c in ("\\", '"', "$", "`"):
    s = s.replace(c, "\\" + c)
  return s


def accelerator(name: str) -> tuple[str, str]:
  """(gcloud accelerator type, generation); v5e-N is spelled v5litepod-N by gcloud."""
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.strip().lower())
  if not m:
    raise common.LaunchError(f"--accelerator_type={name!r} is not a TPU slice type; use e.g. "
                             "v5p-32, v5e-16 / v5litepod-16, v6e-256, v4-64")
  gen = "v5litepod" if m.group(1) == "v5e" else m.group(1)
  return f"{gen}-{m.group(2)}", gen


def hosts(accel: str) -> int:
  """TPU VM hosts of one slice: 4 chips per host (v4/v5p names count 2 cores per chip);
  v5e / v6e slices of up to 8 chips are one host."""
  gen, n = accel.rsplit("-", 1)
  chips = int(n) // 2 if gen in ("v4", "v5p") else int(n)
  return 1 if chips <= (8 if gen in ("v5litepod", "v6e") else 4) else chips // 4


def commands(actions: list[str], *, name: str, zone: str, project: str, accelerator_type: str,
             version: str, spot: bool, num_slices: int, queued: bool, repo: str, branch: str,
             config: str, workdir: str, jax_tpu: str, extra: list[str],
             mount_bucket: str = "") -> list[str]:
  """The gcloud / shell commands of `actions`, one per line."""
  bad = [a for a in actions if a not in ACTIONS]
  if bad:
    raise common.LaunchError(f"--actions has unknown step(s) {bad}; use some of {list(ACTIONS)}")
  if not name or not zone:
    raise common.LaunchError("--name and --zone are required")
  if num_slices < 1:
    raise common.LaunchError(f"--num_slices={num_slices} must be >= 1")
  accel, gen = accelerator(accelerator_type)
  if "train" in actions and not workdir:
    raise common.LaunchError("--workdir is required to train (use gs://BUCKET/... so every "
                             "worker writes to the same checkpoints)")
  shared = workdir.startswith("gs://") or (bool(mount_bucket) and workdir.startswith(
      f"/mnt/{mount_bucket}/"))
  if "train" in actions and hosts(accel) * num_slices > 1 and not shared:
    raise common.LaunchError(f"--workdir={workdir!r}: a multi-host slice needs a workdir all "
                             "workers share: gs://BUCKET/... or --mount_bucket=BUCKET with "
                             "--workdir=/mnt/BUCKET/...")
  version = version or RUNTIME[gen]
  qr = queued or num_slices > 1
  loc = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])
  nodes = [f"{name}-{i}" for i in range(num_slices)] if qr else [name]

  def ssh(node: str, command: str, worker: str = "all") -> str:
    cmd = _dq(command).replace(_COORD, f"$({coord}):{MEGASCALE_PORT}")
    return (common.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *loc,
                         f"--worker={worker}"]) + f' --command="{cmd}"')

  # Slice 0's worker 0 coordinates the slices; its IP is looked up when the line runs.
  coord = common.join(["gcloud", "compute", "tpus", "tpu-vm", "describe", nodes[0], *loc,
                       "--format=value(networkEndpoints[0].ipAddress)"])

  lines: list[str] = []
  for action in actions:
    if action == "create" and not qr:
      lines.append(common.join(["gcloud", "compute", "tpus", "tpu-vm", "create", name, *loc,
                                f"--accelerator-type={accel}", f"--version={version}",
                                *(["--spot"] if spot else [])]))
    elif action == "create":
      lines.append(common.join(
          ["gcloud", "compute", "tpus", "queued-resources", "create", name, *loc,
           f"--accelerator-type={accel}", f"--runtime-version={version}",
           f"--node-count={num_slices}", f"--node-prefix={name}", *(["--spot"] if spot else [])]))
      describe = common.join(["gcloud", "compute", "tpus", "queued-resources", "describe", name,
                              *loc, "--format=value(state.state)"])
      lines.append(f"until [ \"$({describe})\" = ACTIVE ]; do sleep 30; done")
    elif action == "copy" and repo:
      clone = (f"git clone --branch {common.join([branch])} {common.join([repo])} {CODE_DIR} || "
               f"(cd {CODE_DIR} && git fetch origin && git checkout {common.join([branch])} && "
               f"git pull --ff-only)")
      lines += [ssh(n, clone) for n in nodes]
    elif action == "copy":
      lines.append(common.join(["tar", "czf", TARBALL, "--exclude=.git", "--exclude=.venv",
                                "--exclude=runs", "--exclude=__pycache__", "."]))
      for n in nodes:
        lines.append(common.join(["gcloud", "compute", "tpus", "tpu-vm", "scp", TARBALL,
                                  f"{n}:{TARBALL}", *loc, "--worker=all"]))
        lines.append(ssh(n, f"mkdir -p {CODE_DIR} && tar xzf {TARBALL} -C {CODE_DIR}"))
    elif action == "setup":
      install = (f"cd {CODE_DIR} && python3 -m pip install -q -r requirements.txt "
                 f"{common.join([jax_tpu])}")
      if mount_bucket:
        install += (f" && sudo mkdir -p /mnt/{mount_bucket} && sudo chown $USER /mnt/{mount_bucket}"
                    f" && gcsfuse --implicit-dirs {mount_bucket} /mnt/{mount_bucket}")
      lines += [ssh(n, install) for n in nodes]
    elif action == "train":
      train = common.join(common.train_args(config, workdir, extra, "python3"))
      for i, n in enumerate(nodes):
        env = "MMFREE_DISTRIBUTED=1"
        if num_slices > 1:
          env = (f"MEGASCALE_COORDINATOR_ADDRESS={_COORD} MEGASCALE_NUM_SLICES={num_slices} "
                 f"MEGASCALE_SLICE_ID={i} MEGASCALE_PORT={MEGASCALE_PORT} {env}")
        lines.append(ssh(n, f"cd {CODE_DIR} && {env} setsid nohup {train} > {LOG} 2>&1 "
                            "< /dev/null &"))
    elif action == "logs":
      lines.append(ssh(nodes[0], f"tail -n +1 -F {LOG}", worker="0"))
    elif action == "delete" and not qr:
      lines.append(common.join(["gcloud", "compute", "tpus", "tpu-vm", "delete", name, *loc,
                                "--quiet"]))
    elif action == "delete":
      lines.append(common.join(["gcloud", "compute", "tpus", "queued-resources", "delete", name,
                                *loc, "--force", "--quiet"]))
  return lines


def main(argv):
  try:
    actions = [a.strip() for a in _ACTIONS.value.split(",") if a.strip()]
    lines = commands(actions, name=_NAME.value, zone=_ZONE.value, project=_PROJECT.value,
                     accelerator_type=_ACCEL.value, version=_VERSION.value, spot=_SPOT.value,
                     num_slices=_NUM_SLICES.value, queued=_QUEUED.value, repo=_REPO.value,
                     branch=_BRANCH.value, config=_CONFIG.value, workdir=_WORKDIR.value,
                     jax_tpu=_JAX_TPU.value, extra=list(argv[1:]), mount_bucket=_MOUNT.value)
  except common.LaunchError as e:
    common.fail(str(e))
  sys.exit(common.run_lines(lines, _DRY_RUN.value))


if __name__ == "__main__":
  app.run(main)
