"""grain pipeline: tokenized documents -> packed, checkpointable LM batches."""

from __future__ import annotations

import atexit
from collections.abc import Iterator, Sequence
import os
from typing import Any
import weakref

from absl import flags
import grain
import numpy as np

from mmfree_jax.data import builder as builder_lib
from mmfree_jax.data import tokenizer as tokenizer_lib

#     tfds data source (random access) -> grain.MapDataset
#     -> shard by process (disjoint) -> shuffle(seed, reshuffled every epoch)
#     -> repeat -> ConcatThenSplit packing into rows of seq_len + 1 tokens
#        (long documents are split across rows) -> batch -> LM features.
#
# Two ways to split the data over processes (`process_shard`):
# - "documents": each process packs its own document shard `process_index::process_count`
#   into `batch_size` rows. Reads 1/P of the corpus per process (for huge corpora), but
#   the global batch depends on the process count.
# - "rows": every process runs the identical global pipeline (same seed, same packing)
#   into `batch_size * process_count` rows and keeps rows
#   `[process_index * batch_size, (process_index + 1) * batch_size)`. Every process reads
#   and packs the whole stream (P times the host work, cheap next to a train step at
#   these scales), and the global batch, hence training, is the same for any process count.
#
# Batch (numpy): `inputs` int32 [B, T], `targets` int32 [B, T] (next token),
# `segment_ids` int32 [B, T] (document of each input token, 1, 2, ... within a
# row, 0 = padding), `weights` float32 [B, T] (1 where the target is a real token
# of the input's document). Padding uses token id 0 and always has weight 0.
#
# The iterator supports `get_state()` / `set_state()` and orbax through
# `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`.

Batch = dict[str, np.ndarray]
_KEY = "tokens"
_LIVE: weakref.WeakSet[grain.DatasetIterator] = weakref.WeakSet()


class _ToTokens(grain.transforms.Map):
  """Example -> {"tokens": int32 [n]} (tokenizing text if a tokenizer is set)."""

  def __init__(self, feature: str, tokenizer: tokenizer_lib.Tokenizer | None):
    self._feature, self._tokenizer = feature, tokenizer

  def map(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    x = example[self._feature]
    if self._tokenizer is not None:
      text = x.decode("utf-8") if isinstance(x, bytes) else str(x)
      tok = self._tokenizer
      x = [tok.bos_id, *tok.encode(text), tok.eos_id]
    return {_KEY: np.asarray(x, np.int32)}


class _TakeRows(grain.transforms.Map):
  """Global batch -> this process's contiguous block of rows."""

  def __init__(self, start: int, size: int):
    self._start, self._size = start, size

  def map(self, batch: Batch) -> Batch:
    return {k: v[self._start:self._start + self._size] for k, v in batch.items()}


class _ToBatch(grain.transforms.Map):
  """Packed rows [b, T+1] -> LM batch [batch_size, T] (pads missing rows)."""

  def __init__(self, batch_size: int):
    self._batch_size = batch_size

  def map(self, rows: dict[str, np.ndarray]) -> Batch:
    tok, seg = rows[_KEY], rows[f"{_KEY}_segment_ids"]
    pad = ((0, self._batch_size - tok.shape[0]), (0, 0))
    tok, seg = np.pad(tok, pad), np.pad(seg, pad)
    seg_in, seg_out = seg[:, :-1], seg[:, 1:]
    return {
        "inputs": tok[:, :-1].astype(np.int32),
        "targets": tok[:, 1:].astype(np.int32),
        "segment_ids": seg_in.astype(np.int32),
        "weights": ((seg_in == seg_out) & (seg_in > 0)).astype(np.float32),
    }


def documents(
    ds: builder_lib.DatasetHandle | Sequence[builder_lib.DatasetHandle],
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    feature: str = _KEY,
    tokenizer: tokenizer_lib.Tokenizer | None = None,
) -> grain.MapDataset:
  """Random-access dataset of {"tokens": int32 [n]} (one per document).

  `ds`: a `DatasetInfo` from `builder.prepare`, a prepared dataset directory,
  a tfds name ("name/config:version", with `data_dir`), or a list of those
  (concatenated). With `tokenizer`, `feature` is text tokenized on the fly.
  """
  handles = list(ds) if isinstance(ds, (list, tuple)) else [ds]
  parts = []
  for handle in handles:
    source = builder_lib.load_builder(handle, data_dir).as_data_source(split)
    parts.append(grain.MapDataset.source(source))
  docs = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
  return docs.map(_ToTokens(feature, tokenizer))


def make_iterator(
    ds: builder_lib.DatasetHandle | Sequence[builder_lib.DatasetHandle],
    split: str = "train",
    batch_size: int = 8,
    seq_len: int = 128,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    feature: str = _KEY,
    tokenizer: tokenizer_lib.Tokenizer | None = None,
    worker_count: int = 0,
    prefetch: int = 2,
    process_shard: str = "documents",
) -> grain.DatasetIterator:
  """Checkpointable iterator of packed LM batches (per-process batch_size).

  `num_epochs=None` repeats forever; with a finite value the last batch is
  padded (zero weights) and the iterator then stops. With
  `process_shard="documents"` each process reads the disjoint document shard
  `process_index::process_count` (so with finite `num_epochs`, processes may
  yield different numbers of batches: train for a fixed number of steps with
  `num_epochs=None`); with "rows" each process keeps its rows of the identical
  global batch (see the module docstring). `worker_count > 0`
  packs in grain worker processes; `prefetch` batches are prepared in a
  background thread.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"Bad process {process_index} of {process_count}.")
  if process_shard not in ("documents", "rows"):
    raise ValueError(f"process_shard={process_shard!r} is unknown; use documents or rows.")
  rows_mode = process_shard == "rows"
  docs = documents(ds, split, data_dir=data_dir, feature=feature,
                   tokenizer=tokenizer)
  if not rows_mode:
    docs = docs[process_index::process_count]
  if len(docs) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f"No documents for process {process_index} in {split!r}.")
  if shuffle:
    docs = docs.shuffle(seed)
  docs = docs.repeat(num_epochs)
  rows = grain.experimental.ConcatThenSplitIterDataset(
      docs.to_iter_dataset(grain.ReadOptions(num_threads=2)),
      length_struct={_KEY: seq_len + 1},
  )
  global_rows = batch_size * process_count if rows_mode else batch_size
  batches = rows.batch(global_rows, drop_remainder=False).map(_ToBatch(global_rows))
  if rows_mode and process_count > 1:
    batches = batches.map(_TakeRows(process_index * batch_size, batch_size))
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain workers read absl flags.
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count)
    )
  if prefetch > 0:
    batches = grain.experimental.ThreadPrefetchIterDataset(
        batches, prefetch_buffer_size=prefetch
    )
  it = _JsonSafeIterator(iter(batches))
  _LIVE.add(it)
  return it


def make_eval_iterator(
    ds: builder_lib.DatasetHandle | Sequence[builder_lib.DatasetHandle],
    split: str = "validation",
    batch_size: int = 8,
    seq_len: int = 128,
    num_batches: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    **kwargs: Any,
) -> Iterator[Batch]:
  """One ordered pass over `split` for held-out loss (call again per pass).

  With `num_batches`, yields exactly that many batches: truncated, or padded
  with all-zero-weight batches (keeps hosts in lockstep). Held-out loss =
  sum(weights * loss) / sum(weights) over all batches.
  """
  it = make_iterator(
      ds, split, batch_size, seq_len, shuffle=False, num_epochs=1,
      process_index=process_index, process_count=process_count, prefetch=0,
      **kwargs,
  )
  return it if num_batches is None else _exactly(it, num_batches, batch_size,
                                                 seq_len)


def _exactly(
    it: Iterator[Batch], num_batches: int, batch_size: int, seq_len: int
) -> Iterator[Batch]:
  empty = np.zeros((0, seq_len + 1), np.int32)
  empty = _ToBatch(batch_size).map({_KEY: empty, f"{_KEY}_segment_ids": empty})
  for _ in range(num_batches):
    yield next(it, None) or empty


def _tuplify(state: Any) -> Any:
  """Restores the tuples of grain's packer state that JSON turned into lists."""
  if isinstance(state, list):
    return [_tuplify(v) for v in state]
  if not isinstance(state, dict):
    return state
  out = {k: _tuplify(v) for k, v in state.items()}
  if isinstance(out.get("remainder_slices"), dict):  # ConcatThenSplit state.
    out["remainder_slices"] = {
        k: tuple(v) for k, v in out["remainder_slices"].items()
    }
  return out


class _JsonSafeIterator(grain.DatasetIterator):
  """Pass-through iterator whose `set_state` accepts JSON-restored states."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)

  def __next__(self) -> Batch:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(_tuplify(state))


@atexit.register
def _close_live_iterators() -> None:
  """Stops prefetch threads before interpreter teardown (avoids noisy __del__)."""
  for it in list(_LIVE):
    it.close()
