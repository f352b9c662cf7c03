"""An offline corpus for GPU-sized sweeps: the Python sources of installed packages."""

from __future__ import annotations

import hashlib
import json
import os
import site
import sys
import sysconfig
from typing import Sequence

from mmfree_jax import cli

_HELP = """\
    python -m mmfree_jax.data.corpus --out=runs/corpus/python_sources.jsonl [--max_mb=250]

Writes one JSONL document per `.py` file (`{"text": ..., "path": ...}`) found under the
site-packages (and the standard library) of the running interpreter; point a sweep at it
with `data.corpus=<that file>` (the mini sweep's default path). Exact duplicate files are
kept once; files under `min_chars` or over `max_chars` (generated tables) are skipped.
Order: by content hash (deterministic, mixes packages), then cut at `max_bytes`.
About 2.5 characters per Mistral token: 250 MB is ~100M tokens. What it holds depends on
the machine's installed packages: record the printed counts with the results.
"""


def default_roots() -> list[str]:
  """site-packages dirs and the standard library of this interpreter (existing, unique)."""
  paths = sysconfig.get_paths()
  cands = [paths.get("purelib"), paths.get("platlib"), *site.getsitepackages(), paths.get("stdlib")]
  out = []
  for p in cands:
    if p and os.path.isdir(p) and os.path.realpath(p) not in {os.path.realpath(q) for q in out}:
      out.append(p)
  return out


def _is_under(path: str, roots: Sequence[str]) -> bool:
  rp = os.path.realpath(path)
  return any(rp.startswith(os.path.realpath(r) + os.sep) for r in roots)


def python_sources(out_jsonl: str, roots: Sequence[str] | None = None,
                   max_bytes: float = 250e6, min_chars: int = 200,
                   max_chars: int = 200_000) -> dict[str, int]:
  """Writes the .py files under `roots` as JSONL documents; returns counts."""
  roots = list(roots) if roots else default_roots()
  if not roots:
    raise ValueError("no source roots found; pass roots=[directories]")
  for r in roots:
    if not os.path.isdir(r):
      raise ValueError(f"source root {r!r} is not a directory")
  # A root nested in another (site-packages inside stdlib's tree) is walked once.
  roots = [r for r in roots if not _is_under(r, [q for q in roots if q != r])]
  docs: dict[str, tuple[str, str]] = {}  # content hash -> (relpath, text)
  stats = {"files": 0, "duplicates": 0, "skipped_size": 0, "unreadable": 0}
  for root in roots:
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      for fn in sorted(filenames):
        if not fn.endswith(".py"):
          continue
        path = os.path.join(dirpath, fn)
        try:
          with open(path, encoding="utf-8") as f:
            text = f.read()
        except (OSError, UnicodeDecodeError):
          stats["unreadable"] += 1
          continue
        stats["files"] += 1
        if not min_chars <= len(text) <= max_chars:
          stats["skipped_size"] += 1
          continue
        h = hashlib.sha1(text.encode("utf-8")).hexdigest()
        if h in docs:
          stats["duplicates"] += 1
          continue
        docs[h] = (os.path.relpath(path, root), text)
  os.makedirs(os.path.dirname(os.path.abspath(out_jsonl)), exist_ok=True)
  written, nbytes = 0, 0
  with open(out_jsonl + ".tmp", "w", encoding="utf-8") as f:
    for h in sorted(docs):
      rel, text = docs[h]
      size = len(text.encode("utf-8"))
      if nbytes + size > max_bytes:
        break
      f.write(json.dumps({"text": text, "path": rel}) + "\n")
      written, nbytes = written + 1, nbytes + size
  os.replace(out_jsonl + ".tmp", out_jsonl)
  stats.update(documents=written, bytes=nbytes)
  return stats


def main(argv: Sequence[str] | None = None) -> int:
  ap = cli.ArgumentParser(prog="python -m mmfree_jax.data.corpus", description=__doc__,
                          epilog=_HELP)
  ap.add_argument("--out", required=True, help="output .jsonl")
  ap.add_argument("--root", action="append", default=[], help="directory (repeatable; "
                  "default: this interpreter's site-packages and stdlib)")
  ap.add_argument("--max_mb", type=float, default=250.0)
  args = ap.parse_args(argv)
  try:
    s = python_sources(args.out, args.root or None, args.max_mb * 1e6)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return cli.BAD_INPUT
  print(f"{s['documents']} documents, {s['bytes'] / 1e6:.1f} MB (~{s['bytes'] / 2.5e6:.0f}M "
        f"tokens) -> {args.out}; {s['files']} files seen, {s['duplicates']} duplicates, "
        f"{s['skipped_size']} skipped for size")
  return 0


if __name__ == "__main__":
  cli.run(main)
