"""SentencePiece tokenizer wrapper.

The default model is Mistral's 32k `tokenizer.model.v1` (the tokenizer of the
released MatMul-free checkpoints), shipped inside the `mistral_common` package:
bos=1, eos=2, no pad piece.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import hashlib
import importlib.resources
import os

import numpy as np
import sentencepiece as spm

DEFAULT_PACKAGE = "mistral_common"
DEFAULT_RESOURCE = "data/tokenizer.model.v1"


def default_model_path() -> str:
  """Path of Mistral's `tokenizer.model.v1` inside the installed mistral_common."""
  try:
    root = importlib.resources.files(DEFAULT_PACKAGE)
  except ModuleNotFoundError as e:
    raise FileNotFoundError(
        f"Default tokenizer needs the {DEFAULT_PACKAGE!r} package "
        "(pip install mistral-common) or pass tokenizer_path=<file.model>."
    ) from e
  return str(root.joinpath(*DEFAULT_RESOURCE.split("/")))


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
  """Thin wrapper around a `SentencePieceProcessor`."""

  sp: spm.SentencePieceProcessor
  path: str

  def __reduce__(self):  # Picklable (grain worker processes): reload by path.
    return load_tokenizer, (self.path,)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""
    return self.sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text (multithreaded), without bos/eos."""
    return self.sp.encode(list(texts), num_threads=os.cpu_count() or 1)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; control ids (bos/eos) decode to ''."""
    return self.sp.decode([int(i) for i in ids])

  @property
  def vocab_size(self) -> int:
    return self.sp.vocab_size()

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  @property
  def pad_id(self) -> int:
    """The model's pad id, else 0 (the filler the data pipeline pads with)."""
    pad = self.sp.pad_id()
    return pad if pad >= 0 else 0

  @property
  def name(self) -> str:
    """Short filesystem-safe tag of the model, e.g. 'mistral_v1'."""
    if os.path.realpath(self.path) == os.path.realpath(default_model_path()):
      return "mistral_v1"
    stem = os.path.basename(self.path).removesuffix(".model")
    return "".join(c if c.isalnum() else "_" for c in stem)[:24] or "spm"

  @property
  def sha256(self) -> str:
    """Hash of the serialized model (identifies the tokenizer)."""
    return hashlib.sha256(self.sp.serialized_model_proto()).hexdigest()


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Tokenizer:
  """Loads a SentencePiece `.model` file (None: Mistral v1 default)."""
  path = default_model_path() if path is None else os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"SentencePiece model file not found: {path!r}; pass "
        "tokenizer_path=<existing .model file> or None for the default "
        "Mistral v1 tokenizer."
    )
  try:
    sp = spm.SentencePieceProcessor(model_file=path)
  except (RuntimeError, OSError) as e:
    raise ValueError(
        f"Not a valid SentencePiece model: {path!r} ({e}); pass "
        "tokenizer_path=<a .model file written by sentencepiece> or None."
    ) from e
  return Tokenizer(sp=sp, path=path)
