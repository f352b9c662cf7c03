"""The run directory lock: one holder, named to the next; a dead holder's lock taken over."""

import json
import os
import socket

import pytest

from mmfree_jax.config import ConfigError
from mmfree_jax.train import workdir


def test_second_holder_is_refused_with_pid_and_host(tmp_path):
  wd = str(tmp_path / "run")
  first = workdir.acquire(wd)
  with pytest.raises(ConfigError, match=f"in use by another trainer \\(pid {os.getpid()} on host "
                     f"{socket.gethostname()} since "):
    workdir.acquire(wd)  # another open file description: flock refuses it like another process
  first.release()
  assert not os.path.exists(os.path.join(wd, workdir.LOCK_FILE))
  workdir.acquire(wd).release()


def test_lock_left_by_a_dead_trainer_is_taken_over(tmp_path, capsys):
  wd = tmp_path / "run"
  wd.mkdir()
  dead = {"pid": 2**22 + 1, "host": "node7", "time": 0.0}  # a kill -9 leaves the file, not the flock
  (wd / workdir.LOCK_FILE).write_text(json.dumps(dead))
  with workdir.locked(str(wd)) as lock:
    assert lock.previous == dead
    assert json.loads((wd / workdir.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert f"took over the lock of a trainer that is gone (pid {2**22 + 1} on host node7" in capsys.readouterr().out


def test_not_a_directory_is_one_line_and_created_dirs_are_removed(tmp_path):
  (tmp_path / "file").write_text("x")
  for wd in (tmp_path / "file", tmp_path / "file" / "run"):
    with pytest.raises(ConfigError, match="is not a directory"):
      workdir.acquire(str(wd))
  workdir.acquire(str(tmp_path / "a" / "b")).release()
  assert sorted(os.listdir(tmp_path)) == ["file"]  # nothing left behind
