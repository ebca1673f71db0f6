"""A checkpoint (ours, official, or another Hub folder) as a Hugging Face Hub folder - what
``salmm export --hub-folder DIR`` writes and ``--push-to-hub OWNER/NAME`` uploads: the weights
as safetensors, config.json, and a model card with what they were trained on and with and their
scores (the best validation epoch's, or a ``salmm evaluate`` summary's). Format:
:mod:`salmm.model.hub`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.core.errors import BadInputError
from pipeline.formats.manifest import read_manifest
from salmm.model import hub
from salmm.model.checkpoint import load_checkpoint
from salmm.model.loading import Weights, read_weights, resolve_clip

log = logging.getLogger("salmm.export")


def _best_validation(weights: Weights) -> dict[str, float]:
    """The validation scores of the best epoch a salmm checkpoint recorded ({} otherwise)."""
    if weights.form != "checkpoint" or weights.kind != "salmm-train":
        return {}
    raw = load_checkpoint(weights.resolved)
    best = (raw.get("best") or {}).get("epoch")
    row = next((r for r in raw.get("history") or [] if r.get("epoch") == best), None)
    if row is None:
        return {}
    return {f"valid {k}": v for k, v in row.items()
            if k in ("valid_loss", "CC", "SIM", "KLD") and isinstance(v, int | float)}


def _evaluation(path: str, weights: Weights) -> tuple[dict[str, float], str]:
    """Scores from a ``salmm evaluate`` summary.json (or its folder) of these very weights."""
    file = Path(path) / "summary.json" if Path(path).is_dir() else Path(path)
    try:
        summary = json.loads(file.read_bytes())
        scored = (summary.get("checkpoint") or {}).get("sha256")
        means = summary["means_without_nan"]
        data = summary["prepared"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise BadInputError(file, "not a salmm evaluate summary.json") from None
    if scored != weights.sha256:
        raise BadInputError(file, f"scores another checkpoint (sha256 {str(scored)[:12]}…, not"
                            f" {weights.sha256[:12]}…)")
    where = f"{data.get('split')} split, data version {data.get('version_id')}"
    return {k: v for k, v in means.items() if isinstance(v, int | float)}, where


def _dataset(weights: Weights) -> str | None:
    """The dataset a salmm run trained on, from its prepared folder's manifest if present."""
    if weights.dataset or not weights.config or not weights.config.get("prepared"):
        return weights.dataset
    try:
        return read_manifest(weights.config["prepared"]).get("dataset")
    except BadInputError:
        return None


def write_hub_folder(checkpoint: str, folder: str, *, evaluation: str | None = None,
                     repo_hint: str | None = None) -> dict[str, Any]:
    """Write ``folder`` from ``checkpoint``; its config.json content."""
    weights = read_weights(checkpoint)
    clip = resolve_clip(checkpoint, weights.config, {})
    metrics, scored_on = _best_validation(weights), "the best validation epoch"
    if evaluation:
        metrics, scored_on = _evaluation(evaluation, weights)
    config = weights.config or {}
    training = config if weights.kind == "salmm-train" and weights.form == "checkpoint" \
        else None
    meta = hub.pretrained_config(
        size=tuple(config.get("size") or (256, 256)),
        clip={"clip_model": clip.model, "clip_pretrained": clip.pretrained,
              "profile": clip.profile},
        trained_cached_clip=config.get("cached_clip"), kind=weights.kind,
        sha256=weights.sha256, epoch=weights.epoch, valid_loss=weights.valid_loss,
        git_commit=weights.git_commit, dataset=_dataset(weights),
        dataset_version=weights.dataset_version, metrics=metrics, training=training,
        metrics_from=scored_on)
    hub.write_pretrained(folder, weights.state_dict, meta,
                         hub.model_card(meta, repo_hint or "OWNER/NAME"))
    log.info("wrote %s: the weights of %s as safetensors, config.json and a model card",
             folder, checkpoint)
    return meta
