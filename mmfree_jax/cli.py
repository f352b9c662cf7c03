"""Entry points: the one way every CLI runs (`run`), one-line errors, the console scripts
(`[project.scripts]` in pyproject.toml), config-file imports, progress bars.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any, Callable, Sequence

# Every CLI module defines `main(argv)` returning its exit code (None = 0) and ends with
# `cli.run(main)` (flags parsed by `ArgumentParser`) or `cli.run(main, absl_flags=True)`
# (absl / ml_collections config flags). Bad input (a flag, a config, a file, a checkpoint:
# ValueError, OSError, a damaged .safetensors file) is one `error: ...` line and exit 2;
# MMFREE_TRACEBACK=1 re-raises instead (a ValueError from a bug keeps its traceback).

BAD_INPUT = 2  # the exit code of every CLI for bad input


class ArgumentParser(argparse.ArgumentParser):
  """argparse with a one-line `error: ...` (no usage block) and exit 2 for bad arguments."""

  def __init__(self, **kw: Any):
    kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    super().__init__(**kw)

  def error(self, message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(BAD_INPUT)


def run(main: Callable[..., int | None], absl_flags: bool = False):
  """Runs a CLI's `main` and exits with its code: `main()` (it parses sys.argv itself), or
  with `absl_flags` `main(argv)` after absl has parsed the flags (`parse_flags`). Bad input
  -> one line, exit 2."""
  if absl_flags:
    from absl import app  # noqa: PLC0415
    app.run(lambda argv: _one_line_errors(main, argv), flags_parser=parse_flags)
  else:
    sys.exit(_one_line_errors(main))


def _one_line_errors(main: Callable[..., int | None], *args: Any) -> int | None:
  from safetensors import SafetensorError  # noqa: PLC0415

  try:
    return main(*args)
  except (ValueError, OSError, SafetensorError) as e:
    if os.environ.get("MMFREE_TRACEBACK"):
      raise
    if isinstance(e, SafetensorError):
      path = _safetensors_file(e) or "a .safetensors file"
      print(f"error: {path} is damaged ({one_line(e)}); re-download or re-export the "
            "checkpoint", file=sys.stderr)
    else:
      print(f"error: {e}", file=sys.stderr)
  sys.exit(BAD_INPUT)


def _safetensors_file(e: BaseException) -> str | None:
  """The file a SafetensorError is about: the `filename` argument of the innermost
  safetensors function in its traceback (the Rust error itself does not name it)."""
  name, tb = None, e.__traceback__
  while tb is not None:
    frame = tb.tb_frame
    if "safetensors" in frame.f_code.co_filename and "filename" in frame.f_locals:
      name = str(frame.f_locals["filename"])
    tb = tb.tb_next
  return name


def one_line(e: BaseException) -> str:
  """An exception's message on one line (unescaping the repr-in-str that some libraries raise)."""
  msg = str(e)
  if len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":
    msg = msg[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")
  return " ".join(msg.split())


def import_root(config_file: str) -> str:
  """Puts the parent of a config file's directory on `sys.path` (so `experiments/tiny.py`'s
  `from experiments import base` works wherever the checkout is); returns that directory."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(config_file)))
  if root not in sys.path:
    sys.path.insert(0, root)
  return root


def _config_files(argv: Sequence[str]) -> list[str]:
  """The files named by `--config=FILE[:arg]` / `--config FILE` in `argv`."""
  out = []
  for i, a in enumerate(argv):
    value = a.split("=", 1)[1] if a.startswith("--config=") else (
        argv[i + 1] if a == "--config" and i + 1 < len(argv) else None)
    if value and os.path.isfile(value.split(":")[0]):
      out.append(value.split(":")[0])
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl `flags_parser` for `app.run`: a bad flag or config override -> one line, exit 2."""
  from absl import flags  # noqa: PLC0415

  for f in _config_files(argv):
    import_root(f)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - flags, config files and overrides all raise here
    print(f"error: {one_line(e)}", file=sys.stderr)
    sys.exit(BAD_INPUT)


def load_config(holder):
  """The value of an ml_collections config flag; a config file that fails to load (they load
  lazily, after flag parsing) -> one line, exit 2."""
  try:
    config = holder.value
    config.get("model")
  except OSError as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    print(f"error: cannot load --config: {lines[-1] if lines else e}", file=sys.stderr)
    sys.exit(BAD_INPUT)
  return config


class _DropChatter(logging.Filter):
  """tfds names its builder config at WARNING each time a dataset is opened (12 lines for
  one sweep's --plan); it says nothing to act on."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Using custom data configuration")


def quiet_output():
  """For the trainer and the sweep: drop library chatter (`_DropChatter`), and off a terminal
  make every tqdm bar (ours, tfds', the data builder's; child processes inherit it) redraw at
  most once a minute (TQDM_MININTERVAL)."""
  logging.getLogger("absl").addFilter(_DropChatter())
  if not sys.stderr.isatty():
    os.environ.setdefault("TQDM_MININTERVAL", "60")
    os.environ.setdefault("TQDM_MAXINTERVAL", "60")  # tqdm's monitor would redraw after 10 s


def progress_bar(**kw: Any):
  """A tqdm bar on stderr that redraws at most every 5 s on a terminal and once a minute in a
  log file (each redraw there is a new chunk of text, not an update in place)."""
  import tqdm  # noqa: PLC0415

  kw.setdefault("mininterval", 5.0 if sys.stderr.isatty() else 60.0)
  kw.setdefault("maxinterval", max(kw["mininterval"], 10.0))  # the monitor thread's forced redraws
  return tqdm.tqdm(dynamic_ncols=True, **kw)


# Console scripts: `mmfree-<name> = mmfree_jax.cli:<name>` in pyproject.toml. Each runs the
# `main` of the module that `python -m` runs, as that module's `cli.run` does (True: absl
# flags).
ENTRY_POINTS = {
    "train": ("mmfree_jax.train.__main__", True),
    "sweep": ("mmfree_jax.sweep.__main__", False),
    "report": ("mmfree_jax.scaling.report", False),
    "convert": ("mmfree_jax.convert", False),
    "generate": ("mmfree_jax.generate", False),
    "evaluate": ("mmfree_jax.evaluation.__main__", False),
    "aot": ("mmfree_jax.aot", True),
    "bench": ("mmfree_jax.bench.__main__", True),
}


def _entry_point(name: str) -> Callable[[], None]:
  module, absl_flags = ENTRY_POINTS[name]

  def main():
    run(importlib.import_module(module).main, absl_flags)

  main.__doc__ = f"`mmfree-{name}`: `python -m {module.removesuffix('.__main__')}`."
  return main


train, sweep, report, convert, generate, evaluate, aot, bench = map(_entry_point, ENTRY_POINTS)
