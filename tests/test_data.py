"""Tests of mmfree_jax.data: tokenizer, tfds builder, grain pipeline."""

import collections
import gzip
import json
import os
import pickle
import time

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds
import zstandard

from mmfree_jax.data import builder
from mmfree_jax.data import pipeline
from mmfree_jax.data import tokenizer as tokenizer_lib

WORDS = (
    "the king queen lord lady fool ghost night day sword crown love hate "
    "death life honour fortune heaven earth sea storm wind fire blood tears "
    "speak hear see know think say come go stay fly weep laugh"
).split()


def _text(rng: np.random.Generator, n_words: int) -> str:
  words = rng.choice(WORDS, size=n_words)
  lines = [" ".join(words[i:i + 8]) for i in range(0, n_words, 8)]
  return "\n".join(lines).capitalize() + "."


def _docs(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[str]:
  return [_text(rng, int(rng.integers(lo, hi))) for _ in range(n)]


def _write_jsonl(path, texts, opener=open):
  with opener(path, "wt", encoding="utf-8") as f:
    for t in texts:
      f.write(json.dumps({"text": t, "id": 0}) + "\n")


def _write_zst(path, texts):
  data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
  with open(path, "wb") as f:
    f.write(zstandard.ZstdCompressor().compress(data))


def _encode(tok, text):
  return (tok.bos_id, *tok.encode(text), tok.eos_id)


def _examples(info, split):
  source = tfds.builder_from_directory(info.data_dir).as_data_source(split)
  return [tuple(int(t) for t in x["tokens"]) for x in source]


def _all_docs(info):
  return _examples(info, "train") + _examples(info, "validation")


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
      for x, y in zip(a, b)
  )


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load_tokenizer()


@pytest.fixture(scope="module")
def packing_info(tmp_path_factory):
  """60 documents of 2..~130 tokens (some longer than the test seq_len)."""
  root = tmp_path_factory.mktemp("packing")
  _write_jsonl(root / "docs.jsonl", _docs(np.random.default_rng(0), 60, 1, 90))
  return builder.prepare(
      [root / "docs.jsonl"], root / "data", val_fraction=0.2
  )


@pytest.fixture(scope="session")
def shakespeare_info(tmp_path_factory):
  return builder.prepare("shakespeare", tmp_path_factory.mktemp("shakespeare"))


# Tokenizer.


def test_tokenizer_default_ids_and_round_trip(tok):
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, 0)
  assert tok.name == "mistral_v1"
  for text in ["Hello, world!", "To be, or not to be:\n\n  that is the question.",
               "Ünïcödé 日本語 \t tabs"]:
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode(np.array([tok.bos_id, *ids, tok.eos_id])) == text
  assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]


def test_tokenizer_errors(tmp_path):
  missing = str(tmp_path / "missing.model")
  with pytest.raises(FileNotFoundError, match="missing.model"):
    tokenizer_lib.load_tokenizer(missing)
  bad = tmp_path / "bad.model"
  bad.write_text("not a sentencepiece model")
  with pytest.raises(ValueError, match="bad.model"):
    tokenizer_lib.load_tokenizer(bad)


@pytest.fixture(scope="module")
def small_spm(tmp_path_factory):
  """A tiny user-trained SentencePiece model (byte fallback, bos 1, eos 2)."""
  root = tmp_path_factory.mktemp("spm")
  corpus = root / "corpus.txt"
  corpus.write_text("\n".join(_docs(np.random.default_rng(1), 200, 5, 40)))
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(root / "tiny"), vocab_size=300,
      byte_fallback=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, minloglevel=2,
  )
  return str(root / "tiny.model")


def test_custom_tokenizer_gets_own_dataset(tmp_path, small_spm, tok):
  path = tmp_path / "a.jsonl"
  texts = _docs(np.random.default_rng(2), 10, 5, 30)
  _write_jsonl(path, texts)
  custom = tokenizer_lib.load_tokenizer(small_spm)
  assert custom.vocab_size == 300 and custom.name == "tiny"
  assert custom.decode(custom.encode(texts[0])) == texts[0]
  info_a = builder.prepare([path], tmp_path / "data")
  info_b = builder.prepare([path], tmp_path / "data", small_spm)
  assert info_a.data_dir != info_b.data_dir
  assert "mistral_v1" in info_a.config_name and "tiny" in info_b.config_name
  assert info_b.metadata["vocab_size"] == 300
  assert sorted(_all_docs(info_a)) == sorted(_encode(tok, t) for t in texts)
  assert sorted(_all_docs(info_b)) == sorted(_encode(custom, t) for t in texts)


# Builder.


def test_split_text_merges_paragraphs():
  text = "aaaa\nbb\n\n\n  cccc\n \ndd\n\neeeeeeeee\n\n\nf\n"
  assert builder.split_text(text, 0) == ["aaaa\nbb", "  cccc", "dd", "eeeeeeeee", "f"]
  assert builder.split_text(text, 8) == [
      "aaaa\nbb\n\n  cccc", "dd\n\neeeeeeeee", "f"]
  assert builder.split_text(text, None) == [text.strip("\n")]
  assert builder.split_text("\n \n", 5) == []


def test_builder_formats_exact_tokens(tmp_path, tok):
  rng = np.random.default_rng(3)
  paragraphs = _docs(rng, 8, 12, 30)  # Each >= 40 chars: one doc each.
  (tmp_path / "a.txt").write_text("\n\n\n".join(paragraphs) + "\n")
  jsonl = _docs(rng, 7, 3, 40)
  _write_jsonl(tmp_path / "b.jsonl", jsonl[:3] + ["  "])  # Blank text skipped.
  with open(tmp_path / "b.jsonl", "a") as f:
    f.write("\n")  # Blank line skipped.
  _write_jsonl(tmp_path / "c.jsonl.gz", jsonl[3:5], opener=gzip.open)
  _write_zst(tmp_path / "d.jsonl.zst", jsonl[5:])
  files = [tmp_path / n for n in ("a.txt", "b.jsonl", "c.jsonl.gz", "d.jsonl.zst")]
  info = builder.prepare(files, tmp_path / "data", min_doc_chars=40,
                         val_fraction=0.3)
  texts = paragraphs + jsonl
  is_val = [builder.doc_hash(t) < 0.3 for t in texts]
  assert 0 < sum(is_val) < len(texts)
  want = {s: [_encode(tok, t) for t, v in zip(texts, is_val) if v == (s == "validation")]
          for s in builder.SPLITS}
  for split in builder.SPLITS:
    assert info.splits[split].num_examples == len(want[split])
    assert _examples(info, split) == want[split]  # Source order is kept.
  source = tfds.builder_from_directory(info.data_dir).as_data_source("train")
  assert source[0]["tokens"].dtype == np.int32


def test_split_is_by_content_and_nonempty(tmp_path):
  texts = _docs(np.random.default_rng(4), 30, 5, 20)
  _write_jsonl(tmp_path / "a.jsonl", texts)
  _write_jsonl(tmp_path / "b.jsonl", texts[::-1])
  val_a = set(_examples(builder.prepare([tmp_path / "a.jsonl"], tmp_path / "d"), "validation"))
  val_b = set(_examples(builder.prepare([tmp_path / "b.jsonl"], tmp_path / "d"), "validation"))
  assert val_a == val_b
  # Two documents always give one per split, whatever their hashes.
  for frac in (0.01, 0.99):
    _write_jsonl(tmp_path / "two.jsonl", texts[:2])
    info = builder.prepare([tmp_path / "two.jsonl"], tmp_path / f"d{frac}",
                           val_fraction=frac)
    assert [info.splits[s].num_examples for s in builder.SPLITS] == [1, 1]
  _write_jsonl(tmp_path / "one.jsonl", texts[:1])
  with pytest.raises(ValueError, match="at least 2 documents"):
    builder.prepare([tmp_path / "one.jsonl"], tmp_path / "d1")


def test_prepare_is_idempotent(tmp_path, monkeypatch):
  _write_jsonl(tmp_path / "a.jsonl", _docs(np.random.default_rng(5), 20, 5, 20))
  info = builder.prepare([tmp_path / "a.jsonl"], tmp_path / "data")

  def fail(*args, **kwargs):
    raise AssertionError("rebuilt")

  monkeypatch.setattr(builder.MmfreeText, "_split_generators", fail)
  again = builder.prepare([tmp_path / "a.jsonl"], tmp_path / "data")
  assert again.data_dir == info.data_dir
  assert again.splits["train"].num_examples == info.splits["train"].num_examples
  with pytest.raises(AssertionError, match="rebuilt"):  # Other options: new.
    builder.prepare([tmp_path / "a.jsonl"], tmp_path / "data", val_fraction=0.5)


def test_prepare_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    builder.prepare([tmp_path / "nope.txt"], tmp_path / "data")
  (tmp_path / "a.txt").write_text("some text\n\nmore text")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    builder.prepare([tmp_path / "a.txt"], tmp_path / "data", tmp_path / "nope.model")
  _write_jsonl(tmp_path / "b.jsonl", ["x"])
  with pytest.raises(ValueError, match="text_field"):
    builder.prepare([tmp_path / "b.jsonl"], tmp_path / "data", text_field="body")
  with pytest.raises(FileNotFoundError, match="dataset_info"):
    pipeline.make_iterator(str(tmp_path), "train")


BAD_FILES = {  # name: (content, what the error says after "<path>")
    "empty.txt": (b"", ": no text"),
    "blank.jsonl": (b'{"text": "  "}\n\n', ": no text"),
    "binary.txt": (bytes(range(256)), ":1: NUL bytes: a binary file"),
    "latin1.txt": ("one\n\ncaf\xe9\n".encode("latin-1"), ":3: not UTF-8 text \\(byte 0xe9\\)"),
    "latin1.jsonl": ('{"text": "a"}\n{"text": "\xe9"}\n'.encode("latin-1"), ":2: not UTF-8"),
    "field.jsonl": (b'{"text": "a"}\n{"body": "b"}\n', ":2: no 'text' field \\(got \\['body'\\]\\)"),
    "number.jsonl": (b'{"text": 7}\n', ":1: field 'text' is not a string \\(int\\)"),
    "torn.jsonl": (b'{"text": "a"}\n{"text": "b\n', ":2: not valid JSON \\(Unterminated string"),
    "torn.txt.gz": (gzip.compress(b"some text " * 100)[:30], ": cannot decompress"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_corpus_files_name_file_and_line(tmp_path, name):
  content, match = BAD_FILES[name]
  good = tmp_path / "good.txt"
  good.write_text("\n\n".join(_docs(np.random.default_rng(0), 4, 5, 20)))
  (tmp_path / name).write_bytes(content)
  with pytest.raises(builder.CorpusError, match=f"{tmp_path / name}{match}"):
    builder.prepare([good, tmp_path / name], tmp_path / "data", min_doc_chars=10)


def test_shakespeare_corpus_and_stats(shakespeare_info):
  info = shakespeare_info
  assert len(info.metadata["files"]) == 42
  n_train = info.splits["train"].num_examples
  n_val = info.splits["validation"].num_examples
  assert 2000 < n_train + n_val < 2600 and 0.03 < n_val / (n_train + n_val) < 0.07
  stats = builder.corpus_stats(info)
  assert stats == builder.corpus_stats(str(info.data_dir))  # Cached.
  assert stats["train"]["docs"] == n_train
  assert 1.4e6 < stats["train"]["tokens"] + stats["validation"]["tokens"] < 1.9e6
  assert stats["train"]["target_tokens"] == stats["train"]["tokens"] - n_train
  assert 5.0 < stats["unigram_entropy"] < 8.0
  assert stats["unigram_xent_validation"] > stats["unigram_entropy"] - 0.1
  it = pipeline.make_iterator(info, "train", batch_size=8, seq_len=128)
  next(it)
  start = time.perf_counter()
  _take(it, 200)
  assert (time.perf_counter() - start) / 200 < 0.02  # s/batch.


# Pipeline.


def test_batch_format(packing_info):
  batch = next(pipeline.make_iterator(packing_info, "train", 4, 16))
  assert set(batch) == {"inputs", "targets", "segment_ids", "weights"}
  for k, dtype in [("inputs", np.int32), ("targets", np.int32),
                   ("segment_ids", np.int32), ("weights", np.float32)]:
    assert batch[k].shape == (4, 16) and batch[k].dtype == dtype, k


def _check_batches(batches, docs, seq_len, bos=1):
  """Packing invariants; returns the documents re-assembled from `batches`."""
  doc_set = {d for d in docs}
  stream = []
  for b in batches:
    for inp, tgt, seg, w in zip(b["inputs"], b["targets"], b["segment_ids"],
                                b["weights"]):
      assert inp.shape == (seq_len,)
      np.testing.assert_array_equal(inp[1:], tgt[:-1])  # Shifted by one.
      real = seg > 0
      assert not np.any(real[1:] & ~real[:-1])  # Padding only at the end.
      ids = seg[real]
      assert np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
      assert ids.size == 0 or ids[0] == 1
      # Weight 1 exactly when the target continues the input's document.
      np.testing.assert_array_equal(w, real & (tgt != bos) & (tgt != 0))
      np.testing.assert_array_equal(seg[:-1] != seg[1:], (tgt[:-1] == bos) |
                                    (real[:-1] & ~real[1:]))
      for s in np.unique(ids):  # Each segment is a slice of one document.
        piece = list(inp[seg == s]) + ([tgt[seg == s][-1]] if w[seg == s][-1] else [])
        assert any(_contains(d, piece) for d in doc_set), piece
      stream += list(inp[real]) + ([tgt[-1]] if tgt[-1] != 0 else [])
  out, cur = [], None
  for t in stream:
    if t == bos:
      cur = [t]
      out.append(cur)
    else:
      cur.append(t)
  return [tuple(int(t) for t in d) for d in out]


def _contains(doc, piece):
  n = len(piece)
  return any(list(doc[i:i + n]) == piece for i in range(len(doc) - n + 1))


def test_packing_one_epoch_loses_nothing(packing_info):
  docs = _examples(packing_info, "train")
  assert all(0 not in d and d.count(1) == 1 for d in docs)
  assert max(map(len, docs)) > 3 * 16  # Long documents get split.
  batches = list(pipeline.make_iterator(packing_info, "train", 3, 16, seed=7,
                                        num_epochs=1))
  assembled = _check_batches(batches, docs, 16)
  assert collections.Counter(assembled) == collections.Counter(docs)
  assert assembled != docs  # Shuffled.
  rows = -(-sum(map(len, docs)) // 17)  # No padding but in the last row.
  assert len(batches) == -(-rows // 3)


def test_repeat_reshuffles_epochs(packing_info):
  docs = _examples(packing_info, "train")
  n = sum(map(len, docs))
  batches = _take(pipeline.make_iterator(packing_info, "train", 2, 16, seed=3), 4 * n // 34)
  assembled = _check_batches(batches, docs, 16)
  first, second = assembled[:len(docs)], assembled[len(docs):2 * len(docs)]
  assert collections.Counter(first) == collections.Counter(docs)
  assert collections.Counter(second) == collections.Counter(docs)
  assert first != second


def test_seed_determinism(packing_info):
  make = lambda seed: _take(pipeline.make_iterator(packing_info, "train", 2, 16, seed=seed), 10)
  assert _same(make(1), make(1))
  assert not _same(make(1), make(2))
  unshuffled = _take(pipeline.make_iterator(packing_info, "train", 2, 16, shuffle=False), 3)
  docs = _examples(packing_info, "train")
  assert tuple(unshuffled[0]["inputs"][0]) == docs[0][:16]


def test_process_shards_disjoint_and_covering(packing_info):
  docs = _examples(packing_info, "train")
  shards = []
  for i in range(3):
    batches = list(pipeline.make_iterator(
        packing_info, "train", 2, 16, seed=5, num_epochs=1, process_index=i,
        process_count=3))
    shards.append(_check_batches(batches, docs, 16))
  assert collections.Counter(sum(shards, [])) == collections.Counter(docs)
  assert all(abs(len(s) - len(docs) / 3) <= 1 for s in shards)
  with pytest.raises(ValueError):
    pipeline.make_iterator(packing_info, "train", process_index=3, process_count=3)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_state_restore_exact(packing_info, prefetch):
  make = lambda: pipeline.make_iterator(packing_info, "train", 2, 16, seed=11,
                                        prefetch=prefetch)
  it = make()
  states, batches = [], []
  for _ in range(40):
    states.append(json.loads(json.dumps(it.get_state())))  # As orbax stores it.
    batches.append(next(it))
  for k in range(0, 36):
    restored = make()
    _take(restored, k % 3)  # Restoring must not depend on where it was.
    restored.set_state(states[k])
    assert _same(_take(restored, 4), batches[k:k + 4]), k


def test_state_restore_through_orbax(packing_info, tmp_path):
  make = lambda: pipeline.make_iterator(packing_info, "train", 2, 16, seed=13)
  it = make()
  _take(it, 7)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(7, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = _take(it, 5)
    fresh = make()
    restored = mngr.restore(7, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))
  assert restored["data"] is fresh
  assert _same(_take(fresh, 5), want)
  with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckptr:
    ckptr.save(tmp_path / "single", args=grain.checkpoint.CheckpointSave(it))
    want = _take(it, 3)
    fresh = make()
    ckptr.restore(tmp_path / "single", args=grain.checkpoint.CheckpointRestore(fresh))
  assert _same(_take(fresh, 3), want)


def test_eval_iterator(packing_info):
  docs = _examples(packing_info, "validation")
  batches = list(pipeline.make_eval_iterator(packing_info, "validation", 2, 16))
  assert _check_batches(batches, docs, 16) == docs  # One ordered pass.
  assert _same(batches, list(pipeline.make_eval_iterator(
      packing_info, "validation", 2, 16)))
  n = len(batches)
  padded = list(pipeline.make_eval_iterator(packing_info, "validation", 2, 16,
                                            num_batches=n + 2))
  assert _same(padded[:n], batches) and len(padded) == n + 2
  assert all(b["weights"].sum() == 0 and b["inputs"].shape == (2, 16)
             for b in padded[n:])
  cut = list(pipeline.make_eval_iterator(packing_info, "validation", 2, 16,
                                         num_batches=1))
  assert _same(cut, batches[:1])


def test_other_handles(packing_info):
  root = os.path.dirname(os.path.dirname(os.path.dirname(packing_info.data_dir)))
  name = f"mmfree_text/{packing_info.config_name}:1.0.0"
  by_info = _take(pipeline.make_iterator(packing_info, "train", 2, 16), 3)
  by_dir = _take(pipeline.make_iterator(str(packing_info.data_dir), "train", 2, 16), 3)
  by_name = _take(pipeline.make_iterator(name, "train", 2, 16, data_dir=root), 3)
  assert _same(by_info, by_dir) and _same(by_info, by_name)
  docs = _examples(packing_info, "validation")
  both = list(pipeline.make_eval_iterator([packing_info, packing_info], "validation", 2, 16))
  assert _check_batches(both, docs, 16) == docs + docs


def test_on_the_fly_tokenization(tmp_path, tok):
  texts = _docs(np.random.default_rng(6), 6, 3, 30)

  class TextOnly(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, disable_shuffling=True,
          features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      yield from enumerate({"text": t} for t in texts)

  b = TextOnly(data_dir=str(tmp_path), file_format="array_record")
  b.download_and_prepare()
  batches = list(pipeline.make_eval_iterator(b.info, "train", 2, 8, feature="text",
                                             tokenizer=tok))
  docs = [_encode(tok, t) for t in texts]
  assert _check_batches(batches, docs, 8) == docs


def test_worker_processes(packing_info, tok):
  make = lambda **kw: pipeline.make_iterator(packing_info, "train", 2, 16, seed=17, **kw)
  single = _take(make(), 12)
  it = make(worker_count=1)
  try:
    assert _same(_take(it, 6), single[:6])
    state = json.loads(json.dumps(it.get_state()))
  finally:
    it.close()
  restored = make(worker_count=1)
  try:
    restored.set_state(state)
    assert _same(_take(restored, 6), single[6:])
  finally:
    restored.close()
  assert tokenizer_lib.load_tokenizer().encode("x") == pickle.loads(pickle.dumps(tok)).encode("x")
