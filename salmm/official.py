"""``salmm official`` (``python -m salmm.official CKPT [--check]``): confirm an official SalM²
checkpoint (``model_best_*.tar``) - its epoch and validation loss, every key present with the
right shape; ``--check`` also runs one forward pass on a random 256x256 frame. Reading and
writing the format: :mod:`salmm.model.official`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.core.commandline import module_main

SUMMARY = "Check an official SalM^2 checkpoint."
log = logging.getLogger("salmm.official")

main = module_main(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of official."""
    parser.add_argument("checkpoint",
                        help="e.g. model_best_salmm_TrafficGaze_256x256_incomplete.tar")
    parser.add_argument("--check", action="store_true",
                        help="also run one forward pass on a random frame")


def run(args: argparse.Namespace) -> int:
    """Report the checkpoint; 1 when the forward pass fails."""
    import torch  # lazy: loads after the options

    from salmm.model.net import SalMM  # lazy: as torch
    from salmm.model.official import read_official  # lazy: as torch

    official = read_official(args.checkpoint)
    model = SalMM(backend="auto")
    model.load_state_dict(official.state_dict, strict=True)
    n_params = sum(v.numel() for v in official.state_dict.values())
    log.info("%s", args.checkpoint)
    log.info("  epoch       %s", official.epoch)
    loss = official.valid_loss
    log.info("  valid_loss  %s", "n/a" if loss is None else f"{loss:.6g}")
    log.info("  all %d SalMM keys present with the right shapes (%d values); %d CLIP keys"
             " ignored", len(official.state_dict), n_params, official.ignored_clip_keys)
    if not args.check:
        return 0
    model.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 256, 256, generator=gen), torch.randn(1, 512, generator=gen))
    ok = out.shape == (1, 1, 256, 256) and bool(torch.isfinite(out).all())
    log.info("  forward     [1, 1, 256, 256] map in [%.4g, %.4g]: %s", out.min(), out.max(),
             "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
