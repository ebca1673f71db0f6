"""``salmm official`` (``python -m salmm.official CKPT [--check]``): confirm an official SalM²
checkpoint (``model_best_*.tar``) - its epoch and validation loss, every key present with the
right shape; ``--check`` also runs one forward pass on a random 256x256 frame.

``salmm official fetch trafficgaze|drfixd-rainy|bdda [--out DIR] [--sha256 HEX]`` downloads the
authors' release file (resumable; its sha256 checked against the pinned or given one before it
is kept; every key checked), and says in one line what to do where there is no network. Reading
and writing the format, and the release table: :mod:`salmm.model.official`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.core.commandline import module_main

SUMMARY = ("Check an official SalM^2 checkpoint, or fetch one of the authors' releases"
           " (`salmm official fetch trafficgaze|drfixd-rainy|bdda`).")
log = logging.getLogger("salmm.official")

main = module_main(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of official."""
    parser.add_argument("checkpoint", help="a model_best_*.tar to check, or `fetch`")
    parser.add_argument("release", nargs="?", choices=("trafficgaze", "drfixd-rainy", "bdda"),
                        help="with fetch: the release to download")
    parser.add_argument("--check", action="store_true",
                        help="also run one forward pass on a random frame")
    parser.add_argument("--out", default=".", metavar="DIR",
                        help="with fetch: the folder to put the file in (default: here)")
    parser.add_argument("--sha256", metavar="HEX", help="with fetch: the sha256 the file must"
                        " have (default: the one salmm pins, where it has one)")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage: a release name with fetch and only then."""
    if (args.checkpoint == "fetch") != (args.release is not None):
        parser.error("give `fetch RELEASE` or a checkpoint file")


def fetch(release: str, out: str, sha256: str | None) -> int:
    """Download ``release`` into ``out`` and check it; 0 when pinned and verified, else 0 with
    a warning that it is unpinned (its hash recorded)."""
    from pathlib import Path  # lazy: as the others

    from pipeline.core.errors import BadInputError  # lazy: as the others
    from pipeline.core.network import fetch_file  # lazy: as the others
    from salmm.model.official import RELEASES, read_official, release_url  # lazy: torch

    entry = RELEASES[release]
    pinned = sha256 or entry.sha256
    url = release_url(release)
    dest = Path(out) / entry.file
    try:
        got = fetch_file(url, dest, sha256=pinned)
    except BadInputError as err:
        if "cannot be downloaded here" in str(err):
            raise BadInputError(url, f"{str(err).split(': ', 1)[1]}; download it on a machine"
                                f" with a network, copy it to {dest} and run `salmm official"
                                f" {dest} --check`") from None
        raise
    official = read_official(str(dest))
    log.info("%s: %s (sha256 %s), epoch %s, every SalMM key present", release, dest, got,
             official.epoch)
    if pinned is None:
        log.warning("%s: salmm has no pinned sha256 for this release yet, so the file was"
                    " checked key by key only; pass --sha256 to pin it (this one is %s)",
                    entry.file, got)
    return 0


def run(args: argparse.Namespace) -> int:
    """Report the checkpoint (or fetch a release); 1 when the forward pass fails."""
    if args.checkpoint == "fetch":
        return fetch(args.release, args.out, args.sha256)
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
