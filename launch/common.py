"""Shared launcher plumbing: quoting, dry runs, one-line errors."""

from __future__ import annotations

import shlex
import subprocess
import sys
from typing import NoReturn, Sequence


class LaunchError(ValueError):
  """Bad launcher input; the message says what to change."""


def fail(msg: str) -> NoReturn:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def join(args: Sequence[str]) -> str:
  return " ".join(shlex.quote(str(a)) for a in args)


def env_prefix(env: dict[str, str]) -> str:
  return " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items())


def train_args(config: str, workdir: str, extra: Sequence[str], python: str = "python") -> list[str]:
  """`python -m mmfree_jax.train --config=... --workdir=... <extra>`."""
  return [python, "-m", "mmfree_jax.train", f"--config={config}", f"--workdir={workdir}", *extra]


def run_lines(lines: Sequence[str], dry_run: bool) -> int:
  """Prints (dry run) or runs each shell line in order; stops at the first failure."""
  for line in lines:
    if dry_run:
      print(line)
      continue
    print(f"+ {line}", file=sys.stderr, flush=True)
    rc = subprocess.run(["bash", "-c", line], check=False).returncode
    if rc:
      print(f"error: command failed (exit {rc}): {line}", file=sys.stderr)
      return rc
  return 0
