"""Evaluation: per-choice log-likelihoods vs brute force, acc / acc_norm, WinoGrande partial
scoring, perplexity == exp(mean NLL), the lm-eval adapter core and the CLI."""

import json
import math
import re
import sys
import types
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax.config import preset
from mmfree_jax.evaluation import __main__ as eval_cli
from mmfree_jax.evaluation import lm_eval_adapter, perplexity, tasks
from mmfree_jax.evaluation.lm_eval_adapter import MMFreeJaxLM
from mmfree_jax.evaluation.scoring import EvalError, Scorer
from mmfree_jax.models import LM, init_params


class ByteTokenizer:
  """ids 3..258 = UTF-8 bytes; bos 1, eos 2."""

  bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 259

  def encode(self, text):
    return [b + 3 for b in text.encode()]

  def decode(self, ids):
    return bytes(i - 3 for i in ids if 3 <= i < 259).decode(errors="replace")


TOK = ByteTokenizer()
CFG = preset("micro", "mmfree", vocab_size=300, dtype="float32")
PARAMS = nn.unbox(init_params(CFG, jax.random.key(0)))
PARAMS["lower_bounds"] = jax.random.normal(jax.random.key(3), PARAMS["lower_bounds"].shape)
# A stronger head so log-likelihoods differ clearly between choices.
PARAMS["lm_head"]["kernel"] = PARAMS["lm_head"]["kernel"] * 30
SCORER = Scorer(CFG, PARAMS, batch_size=4, max_length=64)
_logits = jax.jit(lambda t: LM(CFG).apply({"params": PARAMS}, t)[0])

DOCS = {
    "arc_easy": [
        {"question": "Which is hot?", "choices": {"text": ["ice", "the sun", "snow"],
                                                  "label": ["A", "B", "C"]}, "answerKey": "B"},
        {"question": "2+2?", "choices": {"text": ["4", "four hundred and twenty two", "5"],
                                         "label": ["1", "2", "3"]}, "answerKey": "1"},
        {"question": "Sky?", "choices": ["blue and wide open above", "x"], "label": 0},
    ],
    "piqa": [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "x", "label": 0},
             {"goal": "Dry hair", "sol1": "a", "sol2": "use a towel and a dryer", "label": 1}],
    "hellaswag": [{"activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "he",
                   "endings": ["cries [title] a lot.", "x", "sings loudly to them", "y"],
                   "label": "0"}],
    "winogrande": [{"sentence": "The cup broke the _ because it was fragile.",
                    "option1": "cup", "option2": "table", "answer": "2"},
                   {"sentence": "Ann gave Bo a gift since _ was kind.",
                    "option1": "Ann", "option2": "Bo", "answer": "1"}],
    "openbookqa": [{"question_stem": "Plants need", "choices": {
        "text": ["light", "darkness only forever", "rocks", "z"], "label": ["A", "B", "C", "D"]},
        "answerKey": "A"}],
}


def _write(tmp_path, name):
  path = tmp_path / f"{name}.jsonl"
  path.write_text("\n".join(json.dumps(d) for d in DOCS[name]) + "\n")
  return path


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _brute_ll(ctx, cont):
  """Sum log p(cont | ctx): one sequence (right-padded to 64: causal), float64 log-softmax."""
  seq = np.zeros((1, 64), np.int32)
  seq[0, : len(ctx) + len(cont)] = ctx + cont
  logp = _log_softmax64(_logits(jnp.asarray(seq))[0])
  return sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont))


@pytest.mark.parametrize("name", sorted(DOCS))
def test_task_metrics_equal_brute_force(tmp_path, name):
  res = tasks.evaluate(SCORER, TOK, name, _write(tmp_path, name))
  docs = tasks.load_task(name, _write(tmp_path, name))
  pred, pred_norm = [], []
  for doc in docs:
    lls = np.array([_brute_ll(*tasks.encode_pair(TOK, c, x))
                    for c, x in zip(doc.contexts, doc.continuations)])
    pred.append(int(np.argmax(lls)))
    pred_norm.append(int(np.argmax(lls / np.array([len(c) for c in doc.choices]))))
  gold = [d.gold for d in docs]
  assert res["n"] == len(docs)
  assert res["acc"] == pytest.approx(np.mean(np.array(pred) == gold))
  assert res["acc_norm"] == pytest.approx(np.mean(np.array(pred_norm) == gold))


def test_scorer_loglikelihoods_match_brute_force_and_acc_norm_differs():
  arc = [tasks.arc(d) for d in DOCS["arc_easy"]] + [tasks.piqa(d) for d in DOCS["piqa"]]
  reqs = [tasks.encode_pair(TOK, c, x) for d in arc for c, x in zip(d.contexts, d.continuations)]
  got = SCORER.loglikelihood(reqs)
  want = [_brute_ll(*r) for r in reqs]
  np.testing.assert_allclose([g for g, _ in got], want, rtol=1e-5, atol=1e-4)
  # choices of very different lengths: raw sums prefer the short one, per-char the long one
  k, differ = 0, 0
  for d in arc:
    lls = np.array(want[k:k + len(d.choices)])
    k += len(d.choices)
    differ += np.argmax(lls) != np.argmax(lls / [len(c) for c in d.choices])
  assert differ >= 1
  # is_greedy: true exactly when every continuation token is the argmax
  ctx = [TOK.bos_id] + TOK.encode("abc")
  greedy = []
  for _ in range(3):
    seq = np.zeros((1, 64), np.int32)
    seq[0, : len(ctx) + len(greedy)] = ctx + greedy
    greedy.append(int(np.argmax(_logits(jnp.asarray(seq))[0, len(ctx) + len(greedy) - 1])))
  (_, g1), (_, g2) = SCORER.loglikelihood([(ctx, greedy), (ctx, greedy[:2] + [greedy[2] + 1])])
  assert g1 and not g2


def test_winogrande_scores_the_continuation_after_each_filled_prefix():
  d = tasks.winogrande(DOCS["winogrande"][0])
  assert d.contexts == ("The cup broke the cup", "The cup broke the table")
  assert d.continuations == (" because it was fragile.",) * 2 and d.gold == 1
  h = tasks.hellaswag(DOCS["hellaswag"][0])
  assert h.contexts[0] == "Cooking: A man cuts onions. He"
  assert h.continuations[0] == " cries. a lot." and h.gold == 0
  assert tasks.encode_pair(TOK, "ab ", "c") == ([1] + TOK.encode("ab"), TOK.encode(" c"))


@pytest.mark.parametrize("arch,window", [("mmfree", 16), ("transformer", 64)])
def test_perplexity_is_exp_mean_nll(arch, window):
  cfg = CFG if arch == "mmfree" else preset("micro", arch, vocab_size=300, dtype="float32")
  params = PARAMS if arch == "mmfree" else nn.unbox(init_params(cfg, jax.random.key(0)))
  text = "The quick brown fox jumps over the lazy dog; héllo wörld."
  res = perplexity.perplexity_of_text(Scorer(cfg, params, 4, window), TOK, text)
  ids = [1] + TOK.encode(text)
  logp = _log_softmax64(jax.jit(LM(cfg).apply)({"params": params}, jnp.asarray([ids]))[0][0])
  nll = -sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1))
  n_bytes = len(text.encode())
  assert len(ids) - 1 > window or arch == "transformer"  # mmfree carries state across chunks
  assert res["tokens"] == len(ids) - 1 and res["bytes"] == n_bytes
  assert res["nll"] == pytest.approx(nll, rel=1e-5)
  assert res["token_perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
  assert res["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)


def test_lm_eval_adapter_core():
  lm = MMFreeJaxLM(cfg=CFG, params=PARAMS, tokenizer=TOK, batch_size=4, max_length=64)
  req = lambda *a: SimpleNamespace(args=a)
  out = lm.loglikelihood([req("Question: sky?\nAnswer:", " blue"), req("ab ", "c")])
  np.testing.assert_allclose(
      [o[0] for o in out],
      [_brute_ll(*tasks.encode_pair(TOK, "Question: sky?\nAnswer:", " blue")),
       _brute_ll([1] + TOK.encode("ab"), TOK.encode(" c"))], rtol=1e-5, atol=1e-4)
  text = "hello there"
  (rolling,) = lm.loglikelihood_rolling([req(text)])
  assert rolling == pytest.approx(-SCORER.rolling_nll([1] + TOK.encode(text))[0], rel=1e-6)
  assert rolling == pytest.approx(lm.loglikelihood([req("", text)])[0][0], rel=1e-5)
  full = lm.generate_until([req("abc", {"until": [], "max_gen_toks": 6})])[0]
  assert len(full) > 0
  stop = full[2]
  cut = lm.generate_until([req("abc", {"until": [stop], "max_gen_toks": 6})])[0]
  assert cut == full[: full.index(stop)]


def test_cli_runs_tasks_and_perplexity(tmp_path, capsys):
  txt = tmp_path / "t.txt"
  txt.write_text("some text to score, twice: some text to score.")
  args = eval_cli.parse_args([
      "--checkpoint", "unused", "--tasks", f"arc_easy={_write(tmp_path, 'arc_easy')},"
      f"winogrande={_write(tmp_path, 'winogrande')}", "--perplexity", str(txt),
      "--batch_size", "4", "--max_length", "64", "--output", str(tmp_path / "r.json")])
  res = eval_cli.run(args, tokenizer=TOK, cfg=CFG, params=PARAMS)
  out = capsys.readouterr().out
  assert "arc_easy" in out and "bits/byte" in out
  saved = json.loads((tmp_path / "r.json").read_text())
  assert saved["arc_easy"]["n"] == 3 and saved["winogrande"]["n"] == 2
  assert saved == json.loads(json.dumps(res))


def test_log_samples_writes_each_documents_loglikelihoods(tmp_path, capsys):
  path = _write(tmp_path, "arc_easy")
  args = eval_cli.parse_args([
      "--checkpoint", "unused", "--tasks", f"arc_easy={path}", "--batch_size", "4",
      "--max_length", "64", "--output", str(tmp_path / "r.json"), "--log_samples"])
  res = eval_cli.run(args, tokenizer=TOK, cfg=CFG, params=PARAMS)
  assert "samples" not in res["arc_easy"]
  lines = (tmp_path / "r_samples_arc_easy.jsonl").read_text().splitlines()
  recs = [json.loads(l) for l in lines]
  assert [r["doc"] for r in recs] == DOCS["arc_easy"]
  docs = tasks.load_task("arc_easy", path)
  for r, d in zip(recs, docs):
    want = SCORER.loglikelihood([tasks.encode_pair(TOK, c, x) for c, x in
                                 zip(d.contexts, d.continuations)])
    np.testing.assert_allclose(r["loglikelihoods"], [ll for ll, _ in want], rtol=1e-6)
    assert r["is_greedy"] == [g for _, g in want] and r["gold"] == d.gold
    assert r["acc"] == float(int(np.argmax(r["loglikelihoods"])) == d.gold)
  assert np.mean([r["acc"] for r in recs]) == res["arc_easy"]["acc"]
  assert np.mean([r["acc_norm"] for r in recs]) == res["arc_easy"]["acc_norm"]
  with pytest.raises(EvalError, match="--log_samples writes beside --output"):
    eval_cli.run(eval_cli.parse_args(["--checkpoint", "x", "--tasks", f"arc_easy={path}",
                                      "--log_samples"]), tokenizer=TOK, cfg=CFG, params=PARAMS)


def _lm_eval_count_words(doc):
  """lm-evaluation-harness 0.4's ConfigurableTask.count_words, verbatim."""
  return len(re.split(r"\s+", doc))


def test_word_counts_and_documents_aggregate_as_lm_eval(tmp_path):
  docs = ["  First line.\nSecond  line\n\n", "héllo wörld, tab\tseparated\n"]
  assert [perplexity.count_words(d) for d in docs] == [_lm_eval_count_words(d) for d in docs] \
      == [6, 5]
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  res = perplexity.perplexity_of_file(SCORER, TOK, path)
  parts = [perplexity.perplexity_of_text(SCORER, TOK, d) for d in docs]
  assert res["docs"] == 2 and res["words"] == 11
  for k in ("nll", "tokens", "bytes"):
    assert res[k] == pytest.approx(sum(p[k] for p in parts), rel=1e-12), k
  assert res["word_perplexity"] == pytest.approx(math.exp(res["nll"] / 11), rel=1e-12)
  path.write_text('{"txt": "x"}\n')
  with pytest.raises(EvalError, match="docs.jsonl:1 is not a JSON object with a 'text' string"):
    perplexity.perplexity_of_file(SCORER, TOK, path)


def test_bad_task_inputs_are_clear_errors(tmp_path):
  with pytest.raises(EvalError, match="NAME=FILE"):
    eval_cli.parse_tasks("arc_easy")
  with pytest.raises(EvalError, match="unknown task 'mmlu'"):
    eval_cli.parse_tasks("mmlu=x.jsonl")
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"goal": "g", "sol1": "a"}) + "\n")
  with pytest.raises(EvalError, match="document 1 is not in piqa format .*sol2"):
    tasks.load_task("piqa", bad)
  bad.write_text("{not json\n")
  with pytest.raises(EvalError, match="bad.jsonl:1 is not valid JSON"):
    tasks.load_task("piqa", bad)
  with pytest.raises(EvalError, match="not found"):
    tasks.load_task("piqa", tmp_path / "missing.jsonl")


def test_register_with_lm_eval_api(monkeypatch):
  """`register()` against a stand-in for lm_eval's API (lm_eval itself is optional)."""
  registry = {}

  class BaseLM:
    def __init__(self):
      self._rank = 0

  def register_model(name):
    def deco(cls):
      registry[name] = cls
      return cls
    return deco

  mods = {"lm_eval": types.ModuleType("lm_eval"), "lm_eval.api": types.ModuleType("lm_eval.api"),
          "lm_eval.api.model": types.ModuleType("m"), "lm_eval.api.registry": types.ModuleType("r")}
  mods["lm_eval.api.model"].LM = BaseLM
  mods["lm_eval.api.registry"].register_model = register_model
  for k, v in mods.items():
    monkeypatch.setitem(sys.modules, k, v)
  cls = lm_eval_adapter.register()
  assert registry["mmfree_jax"] is cls and issubclass(cls, BaseLM)
  lm = cls(cfg=CFG, params=PARAMS, tokenizer=TOK, batch_size="auto:4", max_length="64",
           device="cpu")
  assert lm._rank == 0 and lm.scorer.max_length == 64
  (ll, _), = lm.loglikelihood([SimpleNamespace(args=("ab ", "c"))])
  assert ll == pytest.approx(_brute_ll([1] + TOK.encode("ab"), TOK.encode(" c")), rel=1e-5)
  # The harness passes --batch_size/--device again next to model_args: model_args win.
  lm2 = cls.create_from_arg_obj({"cfg": CFG, "params": PARAMS, "tokenizer": TOK, "batch_size": 4},
                                {"batch_size": 1, "max_batch_size": None, "device": "cpu"})
  assert lm2.scorer.batch_size == 4
