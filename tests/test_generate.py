"""Generation: greedy == step-by-step argmax, batch == alone, eos, sampling, stream, CLI."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax import generate as generate_cli
from mmfree_jax.config import preset
from mmfree_jax.infer.generate import generate, model_forward, stream
from mmfree_jax.infer.sampling import Sampling, SamplingError, filter_logits
from mmfree_jax.interop import checkpoint, hf
from mmfree_jax.interop import packed as pk
from mmfree_jax.models import init_params

N_NEW = 8
# lengths 11, 3, 9: prefill 8 tokens (or none) then decode the rest of each prompt
PROMPTS = [[1, 5, 7, 9, 11, 13, 17, 19, 23, 29, 31], [1, 3, 6], [1, 4, 4, 4, 2, 8, 8, 8, 8]]
L_MAX = 24  # >= longest prompt + N_NEW


@pytest.fixture(scope="module", params=["mmfree", "transformer"])
def model(request):
  cfg = preset("micro", request.param, vocab_size=300, dtype="float32")
  params = nn.unbox(init_params(cfg, jax.random.key(0)))
  if cfg.arch == "mmfree":
    params["lower_bounds"] = jax.random.normal(jax.random.key(3), params["lower_bounds"].shape)
  return cfg, params, generate(cfg, params, PROMPTS, N_NEW)


_full_logits = jax.jit(lambda cfg, p, t: model_forward(cfg, p, t)[0], static_argnums=0)


def _greedy_reference(cfg, params, prompt, n):
  """Recompute the whole sequence each step (right-padded to L_MAX: causal) and argmax."""
  seq = list(prompt)
  for _ in range(n):
    toks = np.zeros((1, L_MAX), np.int32)
    toks[0, : len(seq)] = seq
    seq.append(int(jnp.argmax(_full_logits(cfg, params, jnp.asarray(toks))[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_greedy_equals_argmax_of_full_forward(model):
  cfg, params, out = model
  assert out.tokens.shape == (3, N_NEW) and out.tokens.dtype == np.int32
  np.testing.assert_array_equal(out.lengths, [N_NEW] * 3)
  for b, prompt in enumerate(PROMPTS):
    assert out.tokens[b].tolist() == _greedy_reference(cfg, params, prompt, N_NEW)
  assert len(set(out.tokens[0].tolist())) > 2  # not a degenerate constant output


def test_batch_equals_each_prompt_alone(model):
  cfg, params, out = model
  for b, prompt in enumerate(PROMPTS):
    alone = generate(cfg, params, [prompt], N_NEW)
    np.testing.assert_array_equal(alone.tokens[0], out.tokens[b])


def test_eos_stops_each_row_and_pads(model):
  cfg, params, out = model
  eos = int(out.tokens[0, 2])  # row 0 emits it as its 3rd token
  res = generate(cfg, params, PROMPTS, N_NEW, eos_id=eos, pad_id=299)
  for b in range(3):
    free = out.tokens[b].tolist()
    n = free.index(eos) + 1 if eos in free else N_NEW
    assert res.lengths[b] == n
    assert res.tokens[b, :n].tolist() == free[:n]
    assert res.tokens[b, n:].tolist() == [299] * (N_NEW - n)
  assert res.lengths[0] <= 3


def test_top_k_1_is_greedy_and_sampling_is_seeded(model):
  cfg, params, out = model
  top1 = generate(cfg, params, PROMPTS, N_NEW, Sampling(temperature=1.0, top_k=1), seed=5)
  np.testing.assert_array_equal(top1.tokens, out.tokens)
  hot = Sampling(temperature=2.0, top_p=0.95)
  a = generate(cfg, params, PROMPTS, N_NEW, hot, seed=1)
  b = generate(cfg, params, PROMPTS, N_NEW, hot, seed=1)
  c = generate(cfg, params, PROMPTS, N_NEW, hot, seed=2)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).mean() > 0.5
  assert (a.tokens != out.tokens).mean() > 0.5


def test_stream_yields_the_same_tokens(model):
  cfg, params, out = model
  assert list(stream(cfg, params, PROMPTS[0], N_NEW)) == out.tokens[0].tolist()
  s = Sampling(temperature=1.0, top_k=20)
  one = generate(cfg, params, [PROMPTS[1]], N_NEW, s, seed=3)
  assert list(stream(cfg, params, PROMPTS[1], N_NEW, s, seed=3)) == one.tokens[0].tolist()
  eos = int(out.tokens[0, 1])
  assert list(stream(cfg, params, PROMPTS[0], N_NEW, eos_id=eos)) == out.tokens[0, :2].tolist()


def test_filter_logits_top_k_top_p():
  probs = np.array([[0.05, 0.5, 0.15, 0.3]])
  x = jnp.log(jnp.asarray(probs))
  kept = lambda **kw: np.isfinite(np.asarray(filter_logits(x, **kw)))[0].tolist()
  assert kept(top_k=2) == [False, True, False, True]
  assert kept(top_p=0.7) == [False, True, False, True]   # 0.5 + 0.3 covers 0.7
  assert kept(top_p=0.8) == [False, True, False, True]   # mass before the 3rd is 0.8
  assert kept(top_p=0.81) == [False, True, True, True]
  assert kept(top_p=0.1) == [False, True, False, False]  # argmax always kept
  with pytest.raises(SamplingError, match="top_p"):
    Sampling(temperature=1.0, top_p=0.0)
  with pytest.raises(SamplingError, match="temperature"):
    Sampling(temperature=-1.0)


def test_packed_and_converted_checkpoints_generate_the_same(tmp_path):
  cfg = hf.config_from_hf({"hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 300,
                           "intermediate_size": 64}, dtype="float32")
  tensors = hf.random_hf_tensors(cfg, seed=4)
  hf.save_hf(tmp_path / "hf", cfg, hf.params_from_hf(cfg, tensors))
  cfg1, params = checkpoint.load_model(tmp_path / "hf", dtype="float32")
  ref = generate(cfg1, params, PROMPTS, N_NEW)
  checkpoint.save_packed(tmp_path / "packed", cfg1, pk.pack_params(cfg1, params))
  cfg2, packed = checkpoint.load_model(tmp_path / "packed")
  np.testing.assert_array_equal(generate(cfg2, packed, PROMPTS, N_NEW).tokens, ref.tokens)


def test_bad_requests_are_clear_errors(model):
  cfg, params, _ = model
  with pytest.raises(SamplingError, match="at least one token"):
    generate(cfg, params, [[1, 2], []], 4)
  with pytest.raises(SamplingError, match="out of range"):
    generate(cfg, params, [[1, 300]], 4)
  with pytest.raises(SamplingError, match="max_new_tokens"):
    generate(cfg, params, [[1]], 0)


def test_cli_generates_text(tmp_path, capsys):
  cfg = preset("micro", "mmfree", vocab_size=32000, dtype="float32")
  checkpoint.save_model(tmp_path / "m", cfg, nn.unbox(init_params(cfg, jax.random.key(0))))
  args = ["--checkpoint", str(tmp_path / "m"), "--prompt", "Hello world", "--prompt", "A",
          "--max_new_tokens", "4"]
  assert generate_cli.main(args) == 0
  batch = capsys.readouterr().out.split("-" * 40 + "\n")
  assert batch[0].startswith("Hello world") and batch[1].startswith("A")
  assert generate_cli.main(args[:4] + ["--max_new_tokens", "4", "--stream"]) == 0
  streamed = capsys.readouterr().out
  assert streamed.strip() == batch[0].strip()
  with pytest.raises(SamplingError, match="no prompt"):
    generate_cli.main(["--checkpoint", str(tmp_path / "m")])
