"""``salmm data``: prepared data versions as a user works with them.

* ``salmm data list ROOT`` - every prepared version under ROOT: id, dataset, samples per split,
  frames skipped, options, the raw inputs' fingerprint, when it was made, where it is;
* ``salmm data diff A B`` - what differs between two versions (prepared folders or their
  manifest.json): options, software, raw files added / removed / changed, samples and skipped
  frames, in a few lines;
* ``salmm data reproduce MANIFEST --root RAW --out OUT`` - normalize RAW again with the options
  MANIFEST records and confirm the same version id, or say in one line what differs (exit 1);
* ``salmm data which CHECKPOINT [--root ROOT ...]`` - the version a checkpoint was trained on,
  and where it is present (the folder its run read, or under each ROOT).

The versions themselves: :mod:`pipeline.formats.versions`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.core.commandline import module_main, positive_int
from pipeline.core.errors import BadInputError
from pipeline.formats.versions import (
    VersionDiff,
    describe_options,
    diff_versions,
    find_versions,
    open_version,
)

SUMMARY = "Prepared data versions: list them, diff two, reproduce one, find a checkpoint's."
LISTED = 5  # examples named per kind of difference
log = logging.getLogger("salmm.data")

main = module_main(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The four sub-commands and their options."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="every prepared version under a folder")
    listing.add_argument("root", metavar="ROOT")
    listing.add_argument("--json", action="store_true", help="one JSON object per version")
    diff = sub.add_parser("diff", help="what differs between two versions")
    diff.add_argument("a", metavar="A", help="a prepared folder or its manifest.json")
    diff.add_argument("b", metavar="B")
    again = sub.add_parser("reproduce", help="normalize again with a manifest's options and"
                                             " confirm its version id")
    again.add_argument("manifest", metavar="MANIFEST", help="a manifest.json (or its folder)")
    again.add_argument("--root", required=True, help="the raw dataset root")
    again.add_argument("--out", required=True, help="folder for the new prepared dataset")
    where = again.add_mutually_exclusive_group()
    where.add_argument("--workers", type=positive_int, help="local Dask workers")
    where.add_argument("--dask-address", help="use the Dask scheduler at tcp://HOST:PORT")
    which = sub.add_parser("which", help="the version a checkpoint was trained on")
    which.add_argument("checkpoint", metavar="CHECKPOINT")
    which.add_argument("--root", action="append", default=[], metavar="ROOT",
                       help="also look for it under this folder (repeatable)")


def _samples(samples: dict[str, int]) -> str:
    return " ".join(f"{split} {n}" for split, n in samples.items())


def list_versions(root: str, as_json: bool) -> int:
    versions, problems = find_versions(root)
    for version in versions:
        if as_json:
            sys.stdout.write(json.dumps({"version_id": version.version_id, "dataset": version.dataset,
                              "samples": version.samples, "skipped": version.skipped,
                              "options": version.options,
                              "raw_fingerprint": version.raw_fingerprint,
                              "finished": version.finished, "folder": version.folder}) + "\n")
        else:
            log.info("%s  %-12s  %s, %d skipped  %s  raw %s  %s  %s", version.version_id,
                     version.dataset, _samples(version.samples), version.skipped,
                     describe_options(version.options), version.raw_fingerprint[:12],
                     version.finished or "date unknown", version.folder)
    for problem in problems:
        log.warning("%s", problem)
    if not as_json:
        log.info("%d version(s) under %s%s", len(versions), root,
                 f", {len(problems)} unreadable manifest(s)" if problems else "")
    return 0


def _examples(names: list[str] | dict[str, str]) -> str:
    items = ([f"{k} ({v})" if v else k for k, v in names.items()]
             if isinstance(names, dict) else list(names))
    more = f", … {len(items) - LISTED} more" if len(items) > LISTED else ""
    return ", ".join(items[:LISTED]) + more


def diff_lines(diff: VersionDiff) -> list[str]:
    """A version diff as a few readable lines."""
    a, b = diff.a, diff.b
    lines = [f"A {a.version_id} ({a.dataset}, {a.folder})",
             f"B {b.version_id} ({b.dataset}, {b.folder})"]
    if diff.same:
        return [*lines, "same version: identical options, software, raw inputs and samples"]
    for label, changes in (("dataset", diff.dataset), ("options", diff.options),
                           ("software", diff.software)):
        if changes:
            lines.append(f"{label}: " + "; ".join(f"{k} {va} -> {vb}" for k, va, vb in changes))
    if diff.added or diff.removed or diff.changed:
        parts = [f"{len(diff.added)} added", f"{len(diff.removed)} removed",
                 f"{len(diff.changed)} changed"]
        lines.append(f"raw files: {', '.join(parts)}")
        for label, names in (("added", diff.added), ("removed", diff.removed),
                             ("changed", diff.changed)):
            if names:
                lines.append(f"  {label}: {_examples(names)}")
    else:
        lines.append("raw files: the same")
    if diff.samples:
        lines.append("samples: " + "; ".join(f"{split} {na} -> {nb}"
                                             for split, (na, nb) in diff.samples.items()))
    for label, skipped in (("skipped only in A", diff.skipped_only_a),
                           ("skipped only in B", diff.skipped_only_b)):
        if skipped:
            lines.append(f"{label}: {len(skipped)}: {_examples(skipped)}")
    return lines


def diff(a: str, b: str) -> int:
    for line in diff_lines(diff_versions(open_version(a), open_version(b))):
        log.info("%s", line)
    return 0


def reproduce(manifest: str, root: str, out: str, workers: int | None,
              dask_address: str | None) -> int:
    from pipeline.normalize.job import normalize  # lazy: Dask loads after the options

    recorded = open_version(manifest)
    options = recorded.options
    size = options["size"]
    result = normalize(recorded.dataset, root, out, size=(size["height"], size["width"]),
                       shard_size=options["shard_size"], decode=options["profile"],
                       frame_codec=options["frame"]["codec"],
                       ground_truth=options.get("ground_truth"), workers=workers,
                       dask_address=dask_address,
                       skip_bad=recorded.skipped > 0, max_bad_fraction=1.0)
    if result["version_id"] == recorded.version_id:
        log.info("reproduced version %s in %s", recorded.version_id, out)
        return 0
    lines = diff_lines(diff_versions(recorded, open_version(out)))[2:]
    log.error("%s: made version %s, not the manifest's %s: %s", out, result["version_id"],
              recorded.version_id, "; ".join(line.strip() for line in lines))
    return 1


def which(checkpoint: str, roots: list[str]) -> int:
    from salmm.model.checkpoint import load_checkpoint  # lazy: torch

    raw = load_checkpoint(checkpoint)
    wanted = raw.get("dataset_version")
    if not wanted:
        log.info("%s: no data version recorded (an official release: the authors' data, not"
                 " a salmm prepared version)", checkpoint)
        return 0
    config = raw.get("config") or {}
    places = []
    recorded = config.get("prepared")
    if recorded and Path(recorded).is_dir():
        try:
            if open_version(recorded).version_id == wanted:
                places.append(recorded)
        except BadInputError:
            pass
    for root in roots:
        versions, _ = find_versions(root)
        places += [v.folder for v in versions if v.version_id == wanted and v.folder not in places]
    if places:
        log.info("%s: trained on version %s, present at %s", checkpoint, wanted,
                 ", ".join(places))
    else:
        log.info("%s: trained on version %s, not present (its run read %s%s)", checkpoint,
                 wanted, recorded or "an unrecorded folder",
                 f"; not under {', '.join(roots)}" if roots else "")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        return list_versions(args.root, args.json)
    if args.action == "diff":
        return diff(args.a, args.b)
    if args.action == "reproduce":
        return reproduce(args.manifest, args.root, args.out, args.workers, args.dask_address)
    return which(args.checkpoint, args.root)


if __name__ == "__main__":
    sys.exit(main())
