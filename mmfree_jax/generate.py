"""Generate text from a model directory (ours, HF `hgrn_bit`, or packed).

    python -m mmfree_jax.generate --checkpoint DIR --prompt "Once upon a time" \
        [--prompt "..." | --prompts_file FILE] [--max_new_tokens 64] [--temperature 0.8] \
        [--top_k 50] [--top_p 0.95] [--seed 0] [--stream] [--tokenizer spm.model]

--checkpoint takes a model directory or a run directory (its model/latest); the tokenizer is
the one shipped beside the weights unless --tokenizer is given. Each prompt is encoded with
bos prepended; generation stops per row at eos. Several
prompts run as one batch. `--stream` prints tokens as they are produced (one prompt at a
time). Errors print one line and exit 1.
"""

from __future__ import annotations

import argparse

from mmfree_jax import cli
from mmfree_jax.data.tokenizer import load_tokenizer
from mmfree_jax.infer import generate as gen
from mmfree_jax.infer.sampling import Sampling, SamplingError
from mmfree_jax.interop import checkpoint


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m mmfree_jax.generate", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", required=True, help="model or run directory")
  ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  ap.add_argument("--prompts_file", "--prompts-file", help="one prompt per line")
  ap.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=64)
  ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  ap.add_argument("--top_k", "--top-k", type=int, default=0, help="0 = off")
  ap.add_argument("--top_p", "--top-p", type=float, default=1.0, help="1 = off")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--stream", action="store_true", help="print tokens as they come")
  ap.add_argument("--tokenizer", default=None,
                  help="SentencePiece .model (default: the model's, else Mistral v1)")
  ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                  help="compute dtype override")
  ap.add_argument("--no_bos", "--no-bos", action="store_true", help="do not prepend bos")
  return ap.parse_args(argv)


def _prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompts_file:
    with open(args.prompts_file) as f:
      prompts += [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    raise SamplingError("no prompt given; pass --prompt TEXT or --prompts_file FILE")
  return prompts


def main(argv=None) -> int:
  args = parse_args(argv)
  prompts = _prompts(args)
  sampling = Sampling(args.temperature, args.top_k, args.top_p)
  tok = load_tokenizer(args.tokenizer or checkpoint.tokenizer_file(args.checkpoint))
  cfg, params = checkpoint.load_model(args.checkpoint, dtype=args.dtype)
  if tok.vocab_size > cfg.vocab_size:
    raise SamplingError(f"tokenizer has {tok.vocab_size} ids but the model only "
                        f"{cfg.vocab_size}; pass the --tokenizer the model was trained with")
  bos = [] if args.no_bos else [tok.bos_id]
  ids = [bos + tok.encode(p) for p in prompts]
  if args.stream:
    for p, prompt_ids in zip(prompts, ids):
      # decode prompt + new ids together: SentencePiece drops a leading space otherwise
      shown = tok.decode(prompt_ids)
      print(shown, end="", flush=True)
      out = list(prompt_ids)
      for t in gen.stream(cfg, params, prompt_ids, args.max_new_tokens, sampling, tok.eos_id,
                          args.seed):
        out.append(t)
        text = tok.decode(out)
        print(text[len(shown):], end="", flush=True)
        shown = text
      print()
    return 0
  res = gen.generate(cfg, params, ids, args.max_new_tokens, sampling, tok.eos_id,
                     tok.pad_id, args.seed)
  for b in range(len(prompts)):
    print(tok.decode(ids[b] + res.row(b)))
    if len(prompts) > 1:
      print("-" * 40)
  return 0


if __name__ == "__main__":
  cli.run(main)
