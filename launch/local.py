"""One host: the trainer as one process, or as several `jax.distributed` processes.

    python -m launch.local --config=experiments/tiny.py --workdir=runs/tiny
    python -m launch.local --config=experiments/tiny.py --workdir=runs/mp \
        --num_processes=2 --platform=cpu --devices_per_process=4 -- --config.train.steps=50
    python -m launch.local ... --dry-run      # prints the shell commands, one per line

Several processes get JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (read by `mmfree_jax.multihost.initialize`); on CPU each gets
`--devices_per_process` fake devices, on GPU its own `--devices_per_process` GPUs
(JAX_LOCAL_DEVICE_IDS). Process 0 prints to the terminal, the others to
`<logs>/process_<i>.log`. If one process fails the others are stopped; SIGTERM is
forwarded to all (each saves a checkpoint and exits 0).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from absl import app, flags

from launch import common

_CONFIG = flags.DEFINE_string("config", "experiments/tiny.py", "Experiment config (passed through).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "Run directory (local path or gs://).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes on this host.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 0, "CPU: fake devices per process; GPU: "
                                "GPUs per process (0 = leave as is).")
_PLATFORM = flags.DEFINE_enum("platform", "", ["", "cpu", "gpu"], "Force JAX_PLATFORMS.")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0 = a free one).")
_LOG_DIR = flags.DEFINE_string("logs", "", "Logs of processes > 0 (default <workdir>/logs).")
_PYTHON = flags.DEFINE_string("python", sys.executable, "Python interpreter.")
_DRY_RUN = flags.DEFINE_bool("dry-run", False, "Print the commands instead of running them.")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(i: int, n: int, port: int, platform: str, devices: int) -> dict[str, str]:
  """The environment that makes process `i` of `n` join the run."""
  env: dict[str, str] = {}
  if n > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
               JAX_PROCESS_ID=str(i))
  if platform:
    env["JAX_PLATFORMS"] = platform
  if devices and platform == "cpu":
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  elif devices and platform == "gpu":
    env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(i * devices + d) for d in range(devices))
  return env


def plan(config: str, workdir: str, n: int, port: int, platform: str, devices: int,
         log_dir: str, extra: list[str], python: str) -> list[tuple[dict[str, str], list[str], str]]:
  """(env, argv, log file or "" for the terminal) per process; process 0 last."""
  if n < 1:
    raise common.LaunchError(f"--num_processes={n} must be >= 1")
  if devices < 0:
    raise common.LaunchError(f"--devices_per_process={devices} must be >= 0")
  if devices and not platform:
    raise common.LaunchError("--devices_per_process needs --platform=cpu or --platform=gpu")
  args = common.train_args(config, workdir, extra, python)
  out = []
  for i in list(range(1, n)) + [0]:
    log = os.path.join(log_dir, f"process_{i}.log") if i else ""
    out.append((process_env(i, n, port, platform, devices), args, log))
  return out


def shell_lines(procs, log_dir: str) -> list[str]:
  """The same launch as shell commands, one per line."""
  if len(procs) == 1:
    env, args, _ = procs[0]
    return [" ".join(filter(None, [common.env_prefix(env), common.join(args)]))]
  lines = [common.join(["mkdir", "-p", log_dir])]
  for env, args, log in procs:
    line = f"{common.env_prefix(env)} {common.join(args)}"
    lines.append(f"{line} > {common.join([log])} 2>&1 &" if log else line)
  lines.append("wait")
  return lines


def launch(procs, log_dir: str) -> int:
  """Runs the processes; returns the first non-zero exit code (0 if all succeeded)."""
  if len(procs) > 1:
    os.makedirs(log_dir, exist_ok=True)
  children: list[subprocess.Popen] = []
  files = []

  def forward(signum, frame):
    del frame
    for c in children:
      if c.poll() is None:
        c.send_signal(signum)

  prev = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward)}
  try:
    for env, args, log in procs:
      out = open(log, "w") if log else None
      files.append(out)
      children.append(subprocess.Popen(args, env={**os.environ, **env}, stdout=out,
                                       stderr=subprocess.STDOUT if out else None))
    # SIGTERM -> every process (each checkpoints and exits 0). Ctrl-C reaches them all
    # through the terminal's process group: the launcher just keeps waiting.
    prev[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    rc = 0
    while [c.poll() for c in children].count(None):
      failed = [c.returncode for c in children if c.returncode not in (None, 0)]
      if failed and not rc:
        rc = failed[0]
        print(f"error: a process exited with {rc}; stopping the others (logs in {log_dir})",
              file=sys.stderr)
        forward(signal.SIGTERM, None)
        deadline = time.time() + 30
        while time.time() < deadline and any(c.poll() is None for c in children):
          time.sleep(0.2)
        for c in children:
          if c.poll() is None:
            c.kill()
      time.sleep(0.1)
    return rc or next((c.returncode for c in children if c.returncode), 0)
  finally:
    for s, h in prev.items():
      signal.signal(s, h)
    for f in files:
      if f:
        f.close()


def main(argv):
  extra = list(argv[1:])
  log_dir = _LOG_DIR.value or (os.path.join(_WORKDIR.value, "logs")
                               if "://" not in _WORKDIR.value else "logs")
  n = _NUM_PROCESSES.value
  port = _PORT.value or (free_port() if n > 1 else 0)
  try:
    procs = plan(_CONFIG.value, _WORKDIR.value, n, port, _PLATFORM.value, _DEVICES.value,
                 log_dir, extra, _PYTHON.value)
  except common.LaunchError as e:
    common.fail(str(e))
  if _DRY_RUN.value:
    print("\n".join(shell_lines(procs, log_dir)))
    return
  sys.exit(launch(procs, log_dir))


if __name__ == "__main__":
  app.run(main)
