"""The run directory: one trainer at a time, and small files written whole.

`<workdir>/train.lock` is an flock(2) taken before anything is written to the workdir
and held for the whole run (by process 0 of a multi-process run); it records the
holder's pid and host. The kernel drops the lock when its process dies (kill -9
included), so a lock file left by a dead trainer is taken over, never trusted or
guessed at. Across hosts the lock holds where the shared filesystem implements flock:
NFSv4, Lustre mounted with `-o flock`, GPFS; gcsfuse and other FUSE mounts lock per host
only (there, give every job its own workdir).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import time
from typing import Any, Iterator

from mmfree_jax.config import ConfigError

LOCK_FILE = "train.lock"


@dataclasses.dataclass
class Lock:
  """A held workdir lock. `previous`: the record of a dead holder that was taken over."""

  path: str
  fd: int
  created: list[str]
  previous: dict[str, Any] | None

  def release(self):
    """Drops the lock and removes the directories `acquire` created, if still empty."""
    with contextlib.suppress(FileNotFoundError):  # unlinked while locked: see _lock_fd
      os.unlink(self.path)
    os.close(self.fd)
    for d in self.created:  # innermost first
      with contextlib.suppress(OSError):
        os.rmdir(d)


def describe(record: dict[str, Any] | None) -> str:
  """'pid 12 on host h since 2025-01-01 10:00:00' (or why the holder is unknown)."""
  if not record:
    return "holder unknown: the lock file is empty"
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("time", 0)))
  return f"pid {record.get('pid')} on host {record.get('host')} since {since}"


def _read(fd: int) -> dict[str, Any] | None:
  os.lseek(fd, 0, os.SEEK_SET)
  try:
    record = json.loads(os.read(fd, 4096) or b"null")
  except ValueError:
    return None
  return record if isinstance(record, dict) else None


def _missing_dirs(path: str) -> list[str]:
  """`path` and its ancestors that do not exist yet, innermost first."""
  out = []
  while path and not os.path.lexists(path):
    out.append(path)
    parent = os.path.dirname(path)
    path = parent if parent != path else ""
  return out


def _lock_fd(path: str, workdir: str) -> int:
  """An fd of `path` holding its flock; ConfigError naming the holder if it is taken."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = describe(_read(fd))
      os.close(fd)
      raise ConfigError(f"workdir {workdir} is in use by another trainer ({holder}); wait for "
                        "it to finish, stop it, or pass another --workdir") from None
    with contextlib.suppress(FileNotFoundError):
      if os.stat(path).st_ino == os.fstat(fd).st_ino:
        return fd
    os.close(fd)  # the holder released (and unlinked) it between our open and flock: retry


def acquire(workdir: str) -> Lock:
  """Creates `workdir` if needed and locks it for this process.

  ConfigError (one line) when another live process holds it, or the workdir is not a
  writable directory.
  """
  workdir = os.path.abspath(workdir)
  created = _missing_dirs(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = _lock_fd(path, workdir)
  except (FileExistsError, NotADirectoryError):
    raise ConfigError(f"workdir {workdir} is not a directory (a file is in the way); pass a "
                      "directory to --workdir") from None
  except OSError as e:
    raise ConfigError(f"cannot write to workdir {workdir} ({e.strerror}); pass a writable "
                      "--workdir") from None
  previous = _read(fd)
  record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(record).encode(), 0)
  return Lock(path, fd, created, previous)


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[Lock]:
  """`acquire` ... `release`; a taken-over lock of a dead trainer is reported on stdout."""
  lock = acquire(workdir)
  try:
    if lock.previous:
      print(f"note: took over the lock of a trainer that is gone ({describe(lock.previous)})",
            flush=True)
    yield lock
  finally:
    lock.release()


def write_json(path: str, obj: Any):
  """Writes `path` whole (temporary file + rename): a reader never sees half of it."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)
