"""The dataset card ``README.md`` that ``normalize`` writes beside ``manifest.json``, in the
Hugging Face Hub's dataset-card form (YAML front matter, then markdown): where the data comes
from, its terms (a pointer), counts, version id, what the label is, and the command that makes
the same version. It is not part of the version (the manifest is)."""

from __future__ import annotations

import shlex
from typing import Any

from pipeline.datasets.spec import Dataset

CARD = "README.md"
SYNTHETIC_NOTE = ("\n> **SYNTHETIC**: made from data `pipeline synth` generated (images and gaze"
                  " drawn by a program), not real recordings. Its numbers mean nothing.\n")
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                   (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"))


def size_category(samples: int) -> str:
    """The Hub's ``size_categories`` value for ``samples`` rows."""
    return next((name for bound, name in SIZE_CATEGORIES if samples < bound), "n>10M")


def _label(dataset: Dataset, options: dict[str, Any]) -> str:
    size = options["size"]
    if dataset.has_fixations:
        return (f"each sample stores the driver fixations as recorded (`fixations.npy`, float64"
                f" [N, 2] (row, col) in {dataset.source_size[1]}x{dataset.source_size[0]} source"
                f" pixels); the training label, a {size['width']}x{size['height']} map in [0, 1],"
                " is computed from them when read, exactly as the SalM2 authors' loader does")
    which = (f" (ground truth `{options['ground_truth']}`, read out of the dataset's videos)"
             if options.get("ground_truth") else "")
    points = ("; `fixations.npy` holds the fixated pixels of the frame's fixation map (1-based"
              " (row, col)), which the AUC and NSS metrics use" if dataset.fixation_files else "")
    return (f"each sample stores the released gaze map{which} resized to {size['width']}x"
            f"{size['height']} as an 8-bit PNG (`gaze.png`); the label is value / 255{points}")


def dataset_card(dataset: Dataset, manifest: dict[str, Any], version: str,
                 command: list[str], synthetic: bool = False) -> str:
    """The card's text for a finished ``manifest`` of ``dataset`` with id ``version``, made by
    ``command`` (argv); ``synthetic``: made from ``pipeline synth``'s generated data (said at
    the top and tagged)."""
    options = manifest["options"]
    splits = manifest["splits"]
    total = sum(entry["samples"] for entry in splits.values())
    size = options["size"]
    rows = "\n".join(f"| {split} | {entry['samples']} | {len(entry['shards'])} |"
                     f" {len(entry.get('skipped', []))} |" for split, entry in splits.items())
    return f"""---
pretty_name: {dataset.display} (salmm prepared, version {version})
license: other
tags:
- driver-attention
- saliency
- webdataset
- salmm{chr(10) + "- synthetic" if synthetic else ""}
size_categories:
- {size_category(total)}
---

# {dataset.display}, prepared by salmm: version `{version}`
{SYNTHETIC_NOTE if synthetic else ""}
{total} samples of {dataset.display} as deterministic WebDataset shards
(`<split>-NNNNNN.tar`), {size['width']}x{size['height']} frames ({options['frame']['codec']}),
made by salmm from the raw download. Same raw files and options give the same bytes and the
same version id; `manifest.json` holds everything the id covers and `python -m pipeline verify`
re-checks it.

| split | samples | shards | frames skipped |
| --- | --- | --- | --- |
{rows}

- **Source**: {dataset.source or 'see data/README.md'}
- **Terms of use**: {dataset.terms or 'those of the original release'} (salmm adds no licence of
  its own to the data)
- **Cite**: {dataset.citation or 'the original release'}
- **Label**: {_label(dataset, options)}
- **Version**: `{version}` (raw inputs fingerprint
  `{manifest.get('inputs', {}).get('files', {}).get('sha256', '?')[:16]}`)
- **Made with**: `{shlex.join(command)}` (RAW: the raw download's root, OUT: this folder)
"""
