"""Numbers from the official MatMul-free code itself (github.com/ridgerchu/matmulfreellm),
run where it runs: a CUDA GPU with torch, triton and transformers.

    python -m mmfree_jax.interop.official fixtures --official=PATH --out=tests/fixtures/official
    python -m mmfree_jax.interop.official curves --official=PATH --out=results/faithfulness
    python -m mmfree_jax.interop.official plot --out=results/faithfulness   # CPU: curves.png

PATH is a checkout of the official repository (kept out of this one); its revision is
recorded with the numbers. `fixtures` writes, per model shape, a random `hgrn_bit` model
(`config.json` + bf16 `model.safetensors`, the released checkpoints' layout) with its norm
weights and lower bounds moved away from their init, and `official.npz`: fp32 logits of
the full sequence and token by token through the official cache, the fp32 loss and the
gradient of every parameter (its training path), and logits and loss under bf16 autocast.
`curves` trains the official model (bf16 autocast, AdamW, the paper's schedule) and ours
from the same initial weights on the same token batches, plus official reruns that differ
only in a seed, and writes every run's losses to `curves.json`.

Two shims let the 2024 code run on current torch/triton/transformers without changing its
math: Triton >= 3 lacks `tl.math.round` (official issue #38), so a round-half-away-from-zero
helper (what CUDA's `roundf`, which older Triton called, does) is supplied; and models are
written with safetensors + json directly (its `save_pretrained` breaks on transformers 5).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from typing import Any, Sequence

import numpy as np

try:  # only where the official code runs
  import triton
  import triton.language as tl

  @triton.jit
  def _round_half_away(x):
    t = tl.where(x >= 0, tl.floor(x), tl.ceil(x))
    return tl.where(tl.abs(x - t) >= 0.5, t + tl.where(x >= 0, 1.0, -1.0), t)
except ImportError:
  triton = None

# (d, L, vocab): two shapes; 2 x 32 tokens each.
SHAPES = ((128, 3, 512), (192, 2, 1000))
BATCH, LENGTH = 2, 32
# The curves: a small model on the embedded Shakespeare with the Mistral tokenizer.
CURVES = dict(d=512, n_layers=6, seq_len=512, batch=16, steps=300, peak_lr=4e-3, warmup_frac=0.01)
# name: (init seed, data-order seed, implementation, bitlinear eps for ours)
RUNS = {"official": (0, 0, "official", None),
        "official_rerun": (0, 0, "official", None),
        "official_init_seed1": (1, 0, "official", None),
        "official_data_seed1": (0, 1, "official", None),
        "ours": (0, 0, "ours", None),
        "ours_bitlinear_eps_1e-8": (0, 0, "ours", 1e-8)}


def shape_name(d: int, n_layers: int, vocab: int) -> str:
  return f"d{d}_L{n_layers}_V{vocab}"


def load_official(path: str):
  """Imports `mmfreelm.models` from a checkout, supplying `tl.math.round` where missing."""
  if triton is None:
    raise SystemExit("error: the official code needs torch and triton (a CUDA machine)")
  if not hasattr(tl.math, "round"):
    tl.math.round = _round_half_away
  path = os.path.abspath(path)
  if not os.path.isdir(os.path.join(path, "mmfreelm")):
    raise SystemExit(f"error: {path} is not a checkout of ridgerchu/matmulfreellm "
                     "(no mmfreelm/ inside); pass --official=<its directory>")
  sys.path.insert(0, path)
  import mmfreelm.models as mm  # noqa: PLC0415
  return mm


def revision(path: str) -> str:
  """The checkout's commit: a REVISION file beside an exported tree, else git when `path` is
  the top of its own repository (not a folder inside another one)."""
  f = os.path.join(path, "REVISION")
  if os.path.exists(f):
    return open(f).read().strip()
  def git(*args: str) -> str:
    return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True,
                          check=True).stdout.strip()
  try:
    if os.path.realpath(git("rev-parse", "--show-toplevel")) == os.path.realpath(path):
      return git("rev-parse", "HEAD")
  except (OSError, subprocess.CalledProcessError):
    pass
  return "unknown"


def environment(path: str) -> dict[str, Any]:
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  return {"official_revision": revision(path), "torch": torch.__version__,
          "triton": triton.__version__, "transformers": transformers.__version__,
          "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
          "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}


def build(mm, d: int, n_layers: int, vocab: int, seed: int, perturb: bool):
  """A random official model (float32, bf16-representable weights) and its config dict."""
  import torch  # noqa: PLC0415
  torch.manual_seed(seed)
  cfg = mm.HGRNBitConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=n_layers)
  model = mm.HGRNBitForCausalLM(cfg)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if perturb and name.endswith("lower_bounds"):
        p.copy_(torch.randn(p.shape, generator=gen))
      elif perturb and p.ndim == 1:  # every norm weight
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      p.copy_(p.to(torch.bfloat16).float())  # stored as bf16 without loss
  hf = cfg.to_dict()
  hf.update(model_type="hgrn_bit", architectures=["HGRNBitForCausalLM"], torch_dtype="bfloat16")
  return model, hf


def save_model(model, hf_config: dict, out: str):
  """`config.json` + bf16 `model.safetensors` (what HF's save_pretrained would write)."""
  import torch  # noqa: PLC0415
  from safetensors.torch import save_file  # noqa: PLC0415
  os.makedirs(out, exist_ok=True)
  tensors = {k: v.detach().to(torch.bfloat16).contiguous().cpu()
             for k, v in model.state_dict().items()}
  save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=1, sort_keys=True, default=str)


def _np(t) -> np.ndarray:
  return t.detach().float().cpu().numpy()


def official_numbers(model, tokens) -> dict[str, np.ndarray]:
  """Logits (full, decode), loss and gradients (fp32), logits and loss (bf16 autocast)."""
  import torch  # noqa: PLC0415
  out: dict[str, np.ndarray] = {"tokens": _np(tokens).astype(np.int32)}
  model.eval()
  with torch.no_grad():
    out["logits_full"] = _np(model(tokens).logits)
    cache, steps = None, []
    for t in range(tokens.shape[1]):
      o = model(tokens[:, t:t + 1], past_key_values=cache, use_cache=True)
      cache = o.past_key_values
      steps.append(o.logits[:, 0])
    out["logits_decode"] = _np(torch.stack(steps, 1))
    with torch.autocast("cuda", dtype=torch.bfloat16):
      o = model(tokens, labels=tokens)
    out["bf16_logits"], out["bf16_loss"] = _np(o.logits), _np(o.loss)
  model.train()
  model.zero_grad(set_to_none=True)
  o = model(tokens, labels=tokens)
  o.loss.backward()
  out["loss"] = _np(o.loss)
  for name, p in model.named_parameters():
    out[f"grad/{name}"] = _np(p.grad)
  model.zero_grad(set_to_none=True)
  return out


def fixtures(official: str, out_dir: str) -> dict[str, Any]:
  """Writes one directory per shape under `out_dir` and `manifest.json`."""
  import torch  # noqa: PLC0415
  mm = load_official(official)
  manifest: dict[str, Any] = {**environment(official), "shapes": {}}
  for i, (d, n_layers, vocab) in enumerate(SHAPES):
    name = shape_name(d, n_layers, vocab)
    model, hf_config = build(mm, d, n_layers, vocab, seed=100 + i, perturb=True)
    model = model.cuda()
    gen = torch.Generator().manual_seed(200 + i)
    tokens = torch.randint(0, vocab, (BATCH, LENGTH), generator=gen).cuda()
    nums = official_numbers(model, tokens)
    sub = os.path.join(out_dir, name)
    save_model(model, hf_config, sub)
    np.savez_compressed(os.path.join(sub, "official.npz"), **nums)
    spread = np.abs(nums["logits_full"] - nums["logits_decode"])
    manifest["shapes"][name] = {
        "d": d, "n_layers": n_layers, "vocab": vocab, "batch": BATCH, "length": LENGTH,
        "loss": float(nums["loss"]), "bf16_loss": float(nums["bf16_loss"]),
        "full_vs_decode_max_abs": float(spread.max()),
        "full_vs_decode_mean_abs": float(spread.mean())}
    print(f"{name}: loss {float(nums['loss']):.6f}, full vs decode max |dlogit| "
          f"{spread.max():.3g}", flush=True)
  with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  return manifest


# ----------------------------------------------------------------------------- curves


def token_rows(seq_len: int) -> np.ndarray:
  """The embedded Shakespeare as [N, seq_len + 1] rows of one token stream (bos doc eos ...)."""
  from mmfree_jax.data import builder  # noqa: PLC0415
  from mmfree_jax.data.tokenizer import load_tokenizer  # noqa: PLC0415
  tok = load_tokenizer(None)
  texts = [t for _, t in builder.iter_documents(builder.resolve_sources("shakespeare"))]
  stream = np.concatenate([np.asarray([tok.bos_id, *ids, tok.eos_id], np.int32)
                           for ids in tok.encode_batch(texts)])
  n = len(stream) // (seq_len + 1)
  return stream[:n * (seq_len + 1)].reshape(n, seq_len + 1)


def batch_order(n_rows: int, batch: int, steps: int, seed: int) -> np.ndarray:
  """[steps, batch] row indices: epochs of a seeded permutation, concatenated."""
  rng = np.random.default_rng(seed)
  need = steps * batch
  idx = np.concatenate([rng.permutation(n_rows) for _ in range(-(-need // n_rows))])
  return idx[:need].reshape(steps, batch)


def lr_values(steps: int) -> np.ndarray:
  """The learning rate of each step, from our schedule (the paper's: cosine, halved at T/2)."""
  from mmfree_jax.train.optim import lr_schedule  # noqa: PLC0415
  c = CURVES
  sched = lr_schedule(c["peak_lr"], steps, round(c["warmup_frac"] * steps), "mmfree")
  return np.asarray([float(sched(s)) for s in range(steps)])


def train_official(mm, init_dir: str, rows: np.ndarray, order: np.ndarray, lrs: np.ndarray,
                   init_seed: int) -> list[float]:
  """The official model in bf16 autocast; AdamW (decay on projections and the embedding)."""
  import torch  # noqa: PLC0415
  from safetensors.torch import load_file  # noqa: PLC0415
  c = CURVES
  model, _ = build(mm, c["d"], c["n_layers"], 32000, seed=init_seed, perturb=False)
  if init_seed == 0:  # the exact weights ours starts from
    model.load_state_dict({k: v.float() for k, v in load_file(
        os.path.join(init_dir, "model.safetensors")).items()})
  model = model.cuda().train()
  decay = [p for n, p in model.named_parameters() if n.endswith(("proj.weight", "lm_head.weight",
                                                                 "embeddings.weight"))]
  ids = {id(p) for p in decay}
  rest = [p for p in model.parameters() if id(p) not in ids]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                           {"params": rest, "weight_decay": 0.0}],
                          lr=float(lrs[0]), betas=(0.9, 0.95), eps=1e-8)
  losses = []
  for k in range(len(order)):
    for g in opt.param_groups:
      g["lr"] = float(lrs[k])
    x = torch.from_numpy(rows[order[k]].astype(np.int64)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
      loss = model(x, labels=x).loss  # labels shifted inside: the last position is ignored
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(loss.detach())
  return [float(v) for v in torch.stack(losses).cpu()]


def train_ours(init_dir: str, rows: np.ndarray, order: np.ndarray, steps: int,
               bitlinear_eps: float | None) -> list[float]:
  """Our default config (bf16) from the converted official init, same batches, same schedule."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from experiments import base  # noqa: PLC0415
  from mmfree_jax import sharding  # noqa: PLC0415
  from mmfree_jax.interop import hf  # noqa: PLC0415
  from mmfree_jax.train import optim, step as step_lib  # noqa: PLC0415
  over = {} if bitlinear_eps is None else {"bitlinear_eps": bitlinear_eps}
  cfg, params = hf.load_hf(init_dir, **over)
  config = base.get_config()
  config.optim.update(peak_lr=CURVES["peak_lr"], schedule="mmfree",
                      warmup_frac=CURVES["warmup_frac"])
  tx, sched = optim.make_optimizer(config, steps)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  with jax.set_mesh(mesh):
    params = jax.tree.map(jnp.asarray, params)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32))
    fn = jax.jit(step_lib.make_train_step(cfg, tx, 1, sched), donate_argnums=0)
    losses = []
    for k in range(steps):
      r = rows[order[k]]
      batch = {"inputs": r[:, :-1], "targets": r[:, 1:],
               "weights": np.ones(r[:, 1:].shape, np.float32)}
      state, m = fn(state, batch)
      losses.append(m["loss"])
    return [float(v) for v in jax.device_get(losses)]


def curves(official: str, out_dir: str, steps: int,
           runs: Sequence[str] = tuple(RUNS)) -> dict[str, Any]:
  """Trains `runs` (names in RUNS; "official" always); writes `curves.json` (losses per step,
  summary, environment)."""
  import torch  # noqa: PLC0415
  mm = load_official(official)
  c = CURVES
  os.makedirs(out_dir, exist_ok=True)
  rows = token_rows(c["seq_len"])
  init_dir = os.path.join(out_dir, "init")
  model, hf_config = build(mm, c["d"], c["n_layers"], 32000, seed=0, perturb=False)
  save_model(model, hf_config, init_dir)
  del model
  lrs = lr_values(steps)
  result: dict[str, Any] = {**environment(official), "setup": {**c, "steps": steps,
                            "corpus_rows": int(len(rows))}, "runs": {}, "seconds": {}}
  for name in dict.fromkeys(("official", *runs)):
    init_seed, data_seed, impl, eps = RUNS[name]
    order = batch_order(len(rows), c["batch"], steps, data_seed)
    t0 = time.time()
    if impl == "official":
      losses = train_official(mm, init_dir, rows, order, lrs, init_seed)
      torch.cuda.empty_cache()
    else:
      losses = train_ours(init_dir, rows, order, steps, eps)
    result["seconds"][name] = time.time() - t0
    result["runs"][name] = losses
    print(f"{name}: final loss {losses[-1]:.4f} ({result['seconds'][name]:.0f} s)", flush=True)
  result["summary"] = summarize(result["runs"])
  with open(os.path.join(out_dir, "curves.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


def summarize(runs: dict[str, Sequence[float]], last: int = 100) -> dict[str, float]:
  """Mean |loss - official loss| over the last `last` steps, per run."""
  ref = np.asarray(runs["official"])[-last:]
  return {f"mean_abs_dloss_last{last}": {
      name: float(np.mean(np.abs(np.asarray(v)[-last:] - ref)))
      for name, v in runs.items() if name != "official"}}


def plot(out_dir: str) -> str:
  """`curves.png` from `curves.json`: every run's loss, and each run minus the official one
  (a 10-step running mean; the legend gives the mean |difference| over the last 100 steps)."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  with open(os.path.join(out_dir, "curves.json")) as f:
    res = json.load(f)
  runs, summary = res["runs"], summarize(res["runs"])["mean_abs_dloss_last100"]
  ref = np.asarray(runs["official"])
  colors = dict(zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5))
  for name, v in runs.items():
    steps = np.arange(1, len(v) + 1)
    ax.plot(steps, v, lw=1, color=colors[name], label=name)
    if name != "official":
      w = min(10, len(v))
      diff = np.convolve(np.asarray(v) - ref, np.ones(w) / w, mode="valid")
      bx.plot(steps[w - 1:], diff, lw=1, color=colors[name],
              label=f"{name} (last 100: {summary[name]:.4f})")
  s = res["setup"]
  ax.set(xlabel="step", ylabel="training loss (nats/token)", yscale="log",
         title=f"d={s['d']} L={s['n_layers']}, {s['batch']}x{s['seq_len']} tokens/step, "
               f"peak LR {s['peak_lr']:g}, {res['device']}")
  bx.axhline(0, color="k", lw=0.5)
  bx.set(xlabel="step", ylabel="loss - official loss (10-step mean)",
         title="difference to the official run (mean |diff| over the last 100 steps)")
  for a in (ax, bx):
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(out_dir, "curves.png")
  fig.savefig(path, dpi=110, metadata={"Software": None})
  plt.close(fig)
  return path


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m mmfree_jax.interop.official", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("what", choices=("fixtures", "curves", "plot"))
  ap.add_argument("--official", help="checkout of ridgerchu/matmulfreellm (fixtures, curves)")
  ap.add_argument("--out", required=True, help="output directory")
  ap.add_argument("--steps", type=int, default=CURVES["steps"], help="curves: training steps")
  ap.add_argument("--runs", default=",".join(RUNS), help="curves: comma-separated runs of "
                  f"{list(RUNS)} (official always)")
  args = ap.parse_args(argv)
  runs = [r for r in args.runs.split(",") if r]
  if unknown := sorted(set(runs) - set(RUNS)):
    ap.error(f"--runs: unknown {unknown}; choose from {list(RUNS)}")
  if args.what != "plot" and not args.official:
    ap.error(f"{args.what} needs --official=<checkout of ridgerchu/matmulfreellm>")
  if args.what == "fixtures":
    fixtures(args.official, args.out)
  elif args.what == "curves":
    res = curves(args.official, args.out, args.steps, runs)
    print(json.dumps(res["summary"], indent=1))
  else:
    print(plot(args.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
