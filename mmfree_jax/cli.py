"""Shared entry-point wrapper: bad input becomes one `error: ...` line and exit 1."""

from __future__ import annotations

import sys
from typing import Callable


def run(main: Callable[[], int | None]):
  """Runs `main()`; ValueError/OSError (bad config, data, checkpoint, flags) and a damaged
  .safetensors file -> one line, exit 1."""
  from safetensors import SafetensorError  # noqa: PLC0415

  try:
    sys.exit(main())
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except SafetensorError as e:
    path = _safetensors_file(e) or "a .safetensors file"
    print(f"error: {path} is damaged ({one_line(e)}); re-download or re-export the checkpoint",
          file=sys.stderr)
    sys.exit(1)


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


def parse_flags(argv: list[str]) -> list[str]:
  """absl `flags_parser` for `app.run`: a bad flag or config override -> one line, exit 2."""
  from absl import flags  # noqa: PLC0415

  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - flags, config files and overrides all raise here
    print(f"error: {one_line(e)}", file=sys.stderr)
    sys.exit(2)


def load_config(holder):
  """The value of an ml_collections config flag; a config file that fails to load (they load
  lazily, after flag parsing) -> one line, exit 2."""
  try:
    config = holder.value
    config.get("model")
  except OSError as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    print(f"error: cannot load --config: {lines[-1] if lines else e}", file=sys.stderr)
    sys.exit(2)
  return config
