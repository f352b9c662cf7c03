"""Shared entry-point wrapper: bad input becomes one `error: ...` line and exit 1."""

from __future__ import annotations

import sys
from typing import Callable


def run(main: Callable[[], int | None]):
  """Runs `main()`; ValueError/OSError (bad config, data, checkpoint, flags) -> one line, exit 1."""
  try:
    sys.exit(main())
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
