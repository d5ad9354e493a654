"""`kvtier bench codebooks`: HCAttention's codebooks trained offline from a capture of a model's keys.

k-means per (layer, kv-head, channel group) over the keys of a capture
(`kvtier bench capture-kv`); the file is what `hcattention.codebook.path` loads, so a
server's codebooks come from the model's typical keys instead of each deployment's
first request.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("capture", metavar="CAPTURE", help="a capture file (kvtier bench capture-kv)")
    parser.add_argument("out", metavar="FILE", help="where to write the codebooks")
    parser.add_argument("--groups", type=int, default=0, help="channel groups (default head_dim / 4)")
    parser.add_argument("--entries", type=int, default=256, help="centroids per group (2 to 32768)")
    parser.add_argument("--iterations", type=int, default=10, help="k-means (Lloyd) iterations")
    parser.add_argument("--max-points", type=int, default=65536, help="keys per (layer, kv-head) k-means samples")
    parser.add_argument("--device", default="auto", help="where k-means runs: auto, cpu, cuda")


def run(args: argparse.Namespace) -> int:
    from ..eval.capture import CaptureFileError, load_capture
    from ..runtime.key_index import save_codebooks, train_codebooks
    from ..runtime.standalone import resolve_device

    try:
        cap = load_capture(args.capture)
    except CaptureFileError as exc:
        print(f"kvtier bench codebooks: {exc}", file=sys.stderr)
        return 2
    d = cap.k.shape[3]
    groups = args.groups or max(1, d // 4)
    if d % groups or not 2 <= args.entries <= 32768:
        print(f"kvtier bench codebooks: expected --groups dividing head_dim {d} and --entries in [2, 32768], found "
              f"{groups} and {args.entries}", file=sys.stderr)
        return 2
    keys = cap.k.to(resolve_device(args.device))
    books = train_codebooks(keys, groups, args.entries, iterations=args.iterations, max_points=args.max_points)
    save_codebooks(args.out, books, {**cap.meta, "groups": groups, "entries": args.entries,
                                     "iterations": args.iterations})
    print(f"codebooks {tuple(books.shape)} from {cap.meta.get('model')} ({cap.k.shape[1]} tokens) -> {args.out}")
    return 0
