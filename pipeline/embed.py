"""``python -m pipeline embed`` (``salmm embed``): compute the CLIP embedding cache (Zarr) of a
prepared dataset, every frame and its mirror image; resumable, the same numbers whatever the
batch size, thread or worker count (see :mod:`pipeline.encoders.embedding`)."""

from __future__ import annotations

import argparse
import logging

from pipeline.encoders.clip_spec import PRECISION_NAMES, ClipSpec, add_clip_options
from pipeline.formats.clip_cache import DEFAULT_CHUNK_SIZE, DTYPES

log = logging.getLogger(__name__)
SUMMARY = "Compute the CLIP embedding cache (Zarr) of a prepared dataset, frames and flips."
LOGGER = "pipeline"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m pipeline embed``."""
    parser.add_argument("--prepared", required=True,
                        help="prepared dataset folder or fsspec URL (holds manifest.json)")
    parser.add_argument("--out", default=None,
                        help="cache path (default PREPARED/clip/<model>-<profile>-<weights>.zarr)")
    add_clip_options(parser)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=PRECISION_NAMES, default=None,
                        help="autocast dtype on CUDA (default fp16, as the published model runs"
                        " CLIP); CPU always computes in fp32")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="frames decoded and embedded at a time (each also flipped: 2x"
                        " images), rounded up to the encoder's micro-batch; changes no number")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="samples per Zarr chunk, the unit of resume")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="stored dtype")
    parser.add_argument("--split", action="append", dest="splits", default=None,
                        help="embed only this split (repeatable; default all)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None,
                       help="encoder processes on a local Dask cluster (default: one per usable"
                       " core on CPU, 1 on a GPU; 1 = in this process)")
    where.add_argument("--dask-address", default=None,
                       help="run one task per chunk on this Dask scheduler (workers need the"
                       " prepared shards and the weights)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a store at --out made with other settings (one at the"
                        " default path made from another version of the data is replaced anyway)")


def run(args: argparse.Namespace) -> int:
    """``python -m pipeline embed``: build or finish the cache (its path is logged); exit code."""
    if args.batch_size < 1 or args.chunk_size < 1 or (args.workers is not None
                                                        and args.workers < 1):
        raise SystemExit("embed: --batch-size, --chunk-size and --workers must be at least 1")
    import torch  # lazy: loads after the options

    from pipeline.encoders.embedding import Compute, embed_prepared  # lazy: as torch

    cuda = torch.device(args.device).type == "cuda"
    compute = Compute(args.device, (args.precision or "fp16") if cuda else "fp32")
    spec = ClipSpec(args.clip_model, args.clip_pretrained, args.profile)
    embed_prepared(args.prepared, args.out, spec=spec, compute=compute,
                   batch_size=args.batch_size, chunk_size=args.chunk_size, dtype=args.dtype,
                   splits=args.splits, workers=args.workers, dask_address=args.dask_address,
                   overwrite=args.overwrite)
    return 0
