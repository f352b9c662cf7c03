"""Zero-shot evaluation CLI.

    python -m mmfree_jax.evaluation --checkpoint DIR \
        --tasks arc_easy=arc_e.jsonl,arc_challenge=arc_c.jsonl,hellaswag=hs.jsonl,piqa=piqa.jsonl,winogrande=wg.jsonl,openbookqa=obqa.jsonl \
        [--perplexity text.txt] [--tokenizer spm.model] [--batch_size 8] [--max_length 2048] \
        [--limit N] [--output results.json [--log_samples]]

--checkpoint takes a model directory or a run directory (its model/latest); the tokenizer
is the one shipped beside the weights unless --tokenizer is given. Task file formats: see
mmfree_jax/evaluation/tasks.py; --perplexity takes a text file (one document) or a .jsonl file
(one document per line, field "text"). --log_samples writes each task's per-document
log-likelihoods and predictions to `<output stem>_samples_<task>.jsonl`. Errors print one
line, exit 1.
"""

from __future__ import annotations

import argparse
import json
import os

from mmfree_jax import cli
from mmfree_jax.data.tokenizer import load_tokenizer
from mmfree_jax.evaluation import perplexity, tasks
from mmfree_jax.evaluation.scoring import EvalError, Scorer
from mmfree_jax.interop.checkpoint import load_model, tokenizer_file


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m mmfree_jax.evaluation", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", required=True, help="model or run directory")
  ap.add_argument("--tasks", default="", help="comma-separated NAME=FILE.jsonl")
  ap.add_argument("--perplexity", action="append", default=[], help="text file (repeatable)")
  ap.add_argument("--tokenizer", default=None,
                  help="SentencePiece .model (default: the model's, else Mistral v1)")
  ap.add_argument("--batch_size", "--batch-size", type=int, default=8)
  ap.add_argument("--max_length", "--max-length", type=int, default=2048)
  ap.add_argument("--limit", type=int, default=None, help="first N documents per task")
  ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None)
  ap.add_argument("--no_bos", "--no-bos", action="store_true")
  ap.add_argument("--output", default=None, help="write results as JSON here")
  ap.add_argument("--log_samples", "--log-samples", action="store_true",
                  help="also write per-document records beside --output")
  return ap.parse_args(argv)


def parse_tasks(spec: str) -> list[tuple[str, str]]:
  out = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, sep, path = item.partition("=")
    if not sep or not path:
      raise EvalError(f"--tasks item {item!r} must be NAME=FILE.jsonl")
    if name not in tasks.TASKS:
      raise EvalError(f"unknown task {name!r} in --tasks; use one of {sorted(tasks.TASKS)}")
    out.append((name, path))
  return out


def run(args, tokenizer=None, cfg=None, params=None) -> dict:
  task_list = parse_tasks(args.tasks)
  if not task_list and not args.perplexity:
    raise EvalError("nothing to do; pass --tasks NAME=FILE.jsonl and/or --perplexity FILE")
  if args.log_samples and not args.output:
    raise EvalError("--log_samples writes beside --output; pass --output results.json")
  if cfg is None:
    cfg, params = load_model(args.checkpoint, dtype=args.dtype)
  if tokenizer is None:
    tokenizer = load_tokenizer(args.tokenizer or tokenizer_file(args.checkpoint))
  scorer = Scorer(cfg, params, args.batch_size, args.max_length)
  results: dict = {}
  for name, path in task_list:
    results[name] = r = tasks.evaluate(scorer, tokenizer, name, path, args.limit,
                                       not args.no_bos, args.log_samples)
    if args.log_samples:
      _write_samples(args.output, name, r.pop("samples"))
    print(f"{name:14s} acc {100 * r['acc']:6.2f}  acc_norm {100 * r['acc_norm']:6.2f}  "
          f"(n={r['n']})", flush=True)
  for path in args.perplexity:
    results[f"perplexity:{path}"] = r = perplexity.perplexity_of_file(scorer, tokenizer, path)
    print(f"{path}: token ppl {r['token_perplexity']:.3f}  bits/byte {r['bits_per_byte']:.4f}  "
          f"byte ppl {r['byte_perplexity']:.4f}  ({r['tokens']} tokens)", flush=True)
  if args.output:
    with open(args.output, "w") as f:
      json.dump(results, f, indent=2)
  return results


def _write_samples(output: str, task: str, records: list[dict]):
  path = f"{os.path.splitext(output)[0]}_samples_{task}.jsonl"
  with open(path, "w") as f:
    for rec in records:
      f.write(json.dumps(rec) + "\n")
  print(f"{task}: {len(records)} samples -> {path}", flush=True)


def main(argv=None) -> int:
  run(parse_args(argv))
  return 0


if __name__ == "__main__":
  cli.run(main)
