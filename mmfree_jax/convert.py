"""Convert model directories: HF `hgrn_bit` <-> ours, and ours/HF -> packed 2-bit.

    python -m mmfree_jax.convert HF_DIR OUT_DIR                  # HF -> ours (orbax params)
    python -m mmfree_jax.convert OUR_DIR OUT_DIR --to hf [--dtype float32] [--max_shard_mb 2000]
    python -m mmfree_jax.convert SRC_DIR OUT_DIR --pack          # ternary codes + scales

The source format is detected (see `interop.checkpoint`). Errors print one line and exit 1.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from mmfree_jax import cli
from mmfree_jax.interop import checkpoint, hf


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m mmfree_jax.convert", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("src", help="source model directory (HF hgrn_bit, ours, or packed)")
  ap.add_argument("dst", help="output directory")
  ap.add_argument("--to", choices=("ours", "hf", "packed"), default=None,
                  help="target format (default: ours for an HF source, hf otherwise)")
  ap.add_argument("--pack", action="store_true", help="same as --to packed")
  ap.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16",
                  help="tensor dtype of an HF export (default bfloat16)")
  ap.add_argument("--max_shard_mb", "--max-shard-mb", type=float, default=0,
                  help="split an HF export into shards of this size (0 = one file)")
  return ap.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  src_fmt = checkpoint.detect_format(args.src)
  to = "packed" if args.pack else (args.to or ("ours" if src_fmt == "hf" else "hf"))
  if src_fmt == "packed":
    raise checkpoint.CheckpointError(
        f"{args.src} is a packed export: its latent weights are gone, so it cannot be "
        "converted further; convert from the latent (ours or HF) directory instead")
  cfg, params = checkpoint.load_model(args.src)
  params = checkpoint.to_numpy(params)
  n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  print(f"loaded {src_fmt} checkpoint {args.src}: d={cfg.d_model} L={cfg.n_layers} "
        f"I={cfg.ffn} V={cfg.vocab_size}, {n:,} params")
  if to == "ours":
    checkpoint.save_model(args.dst, cfg, params)
  elif to == "hf":
    shard = int(args.max_shard_mb * 2**20) or None
    files = hf.save_hf(args.dst, cfg, params, args.dtype, shard)
    print(f"wrote {len(files)} files")
  else:
    from mmfree_jax.infer import packed  # pylint: disable=import-outside-toplevel
    packed.save_packed(args.dst, cfg, packed.pack_params(cfg, params))
    b = packed.weight_bytes(cfg, params)
    print(f"BitLinear kernels: {b['kernel_bytes_bf16'] / 2**20:.2f} MiB as bf16 latents -> "
          f"{b['kernel_bytes_packed'] / 2**20:.2f} MiB packed ({b['kernel_ratio']:.2f}x smaller); "
          f"whole model {b['total_bytes_bf16'] / 2**20:.2f} -> "
          f"{b['total_bytes_packed'] / 2**20:.2f} MiB (other weights at bf16)")
  print(f"wrote {to} checkpoint to {args.dst}")
  return 0


if __name__ == "__main__":
  cli.run(main)
