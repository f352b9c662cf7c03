"""Convert model directories: HF `hgrn_bit` <-> ours, and ours/HF -> packed 2-bit.

    python -m mmfree_jax.convert HF_DIR OUT_DIR                  # HF -> ours (orbax params)
    python -m mmfree_jax.convert RUN_OR_MODEL_DIR OUT_DIR --to hf [--dtype bfloat16] [--max_shard_mb 2000]
    python -m mmfree_jax.convert SRC_DIR OUT_DIR --pack [--embed_dtype bfloat16]

The source format is detected (see `interop.checkpoint`; a run directory means its
model/latest). The output records where it came from (the source's step, run and params hash,
and the source directory) and carries the source's tokenizer.model (else --tokenizer, else
Mistral's default). HF exports are float32 by default: ours -> HF -> ours is exact; a 16-bit
export warns when it flips ternary codes. Errors print one line and exit 1.
"""

from __future__ import annotations

import argparse
import os
import warnings

import jax
import numpy as np

from mmfree_jax import cli
from mmfree_jax.data.tokenizer import default_model_path
from mmfree_jax.interop import checkpoint, hf


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m mmfree_jax.convert", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("src", help="source: HF hgrn_bit, ours, packed, or a run directory")
  ap.add_argument("dst", help="output directory")
  ap.add_argument("--to", choices=("ours", "hf", "packed"), default=None,
                  help="target format (default: ours for an HF source, hf otherwise)")
  ap.add_argument("--pack", action="store_true", help="same as --to packed")
  ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                  help="tensor dtype of an HF export (default float32: exact)")
  ap.add_argument("--max_shard_mb", "--max-shard-mb", type=float, default=0,
                  help="split an HF export into shards of this size (0 = one file)")
  ap.add_argument("--embed_dtype", "--embed-dtype", choices=("float32", "bfloat16"),
                  default="float32", help="storage of the embedding in a packed export")
  ap.add_argument("--tokenizer", default=None,
                  help="SentencePiece .model to ship (default: the source's, else Mistral v1)")
  return ap.parse_args(argv)


def _provenance(src: str, fmt: str) -> dict:
  """What the source records about its origin, plus the source directory itself."""
  if fmt == "hf":
    info = hf.read_hf_config(src).get(hf.EXPORT_KEY) or {}
  else:
    info = checkpoint.export_info(src)
  return {**info, "source": os.path.abspath(src)}


def main(argv=None) -> int:
  args = parse_args(argv)
  src = checkpoint.model_dir(args.src)
  src_fmt = checkpoint.detect_format(src)
  to = "packed" if args.pack else (args.to or ("ours" if src_fmt == "hf" else "hf"))
  if src_fmt == "packed":
    raise checkpoint.CheckpointError(
        f"{src} is a packed export: its latent weights are gone, so it cannot be "
        "converted further; convert from the latent (ours or HF) directory instead")
  cfg, params = checkpoint.load_model(src)
  params = checkpoint.to_numpy(params)
  n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  print(f"loaded {src_fmt} checkpoint {src}: d={cfg.d_model} L={cfg.n_layers} "
        f"I={cfg.ffn} V={cfg.vocab_size}, {n:,} params")
  tokenizer = args.tokenizer or checkpoint.tokenizer_file(src)
  if tokenizer is None:
    tokenizer = default_model_path()
    print(f"note: no tokenizer.model beside {src}; shipping Mistral's v1 (pass --tokenizer)")
  export = _provenance(src, src_fmt)
  if to == "ours":
    checkpoint.save_model(args.dst, cfg, params, export, tokenizer)
  elif to == "hf":
    shard = int(args.max_shard_mb * 2**20) or None
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", hf.TernaryCodesChanged)
      files = hf.save_hf(args.dst, cfg, params, args.dtype, shard, tokenizer, export)
    for w in caught:
      if isinstance(w.message, hf.TernaryCodesChanged):
        print(f"warning: {w.message}")
      else:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(f"wrote {len(files)} files")
  else:
    from mmfree_jax.infer import packed  # pylint: disable=import-outside-toplevel
    tree = packed.pack_params(cfg, params, args.embed_dtype)
    packed.save_packed(args.dst, cfg, tree, export, tokenizer)
    b = packed.weight_bytes(params, tree)
    size = os.path.getsize(os.path.join(args.dst, checkpoint.PACKED_FILE))
    print(f"BitLinear kernels: {b['kernel_bytes_bf16'] / 2**20:.2f} MiB as bf16 latents -> "
          f"{b['kernel_bytes_packed'] / 2**20:.2f} MiB packed ({b['kernel_ratio']:.2f}x smaller); "
          f"other weights {b['other_bytes'] / 2**20:.2f} MiB (embedding as {args.embed_dtype}); "
          f"{checkpoint.PACKED_FILE}: {size / 2**20:.2f} MiB")
  print(f"wrote {to} checkpoint to {args.dst}")
  return 0


if __name__ == "__main__":
  cli.run(main)
