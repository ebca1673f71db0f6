"""A run's inputs, checked before any step: the prepared dataset (frame size, train and valid
samples), the CLIP cache (dataset version, model, profile, weights), a resumed checkpoint (format,
dataset, cache, recipe); and the loaders that read them. A mismatch is one line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.core.errors import BadInputError
from pipeline.formats.prepared import PreparedDataset
from pipeline.formats.shard_index import SampleReader
from salmm.data.stages import (
    EmbeddingTable,
    EpochBatches,
    IndexedSamples,
    SaliencyShards,
    make_indexed_loader,
    make_loader,
)
from salmm.model.checkpoint import FORMAT, load_checkpoint
from salmm.training.config import RECIPE_FIELDS, TrainConfig
from salmm.training.runtime import Runtime

log = logging.getLogger("salmm.train")     # one logger for the run: train.log holds it all


def check_prepared(cfg: TrainConfig, data: PreparedDataset) -> None:
    """BadInputError unless the prepared data has train and valid samples at the run's size."""
    size = data.manifest.get("options", {}).get("size", {})
    prepared = (size.get("height"), size.get("width"))
    if prepared != tuple(cfg.size):
        raise BadInputError(cfg.prepared, f"prepared at {prepared[1]}x{prepared[0]} (width x"
                            f" height) but the run asks --size {cfg.size[1]}x{cfg.size[0]}; pass"
                            f" --size {prepared[1]}x{prepared[0]} or prepare that size with"
                            " `python -m pipeline normalize --size`")
    for split in ("train", "valid"):
        if not data.samples(split):
            raise BadInputError(cfg.prepared, f"has no {split} samples; training needs train"
                                " and valid splits")


def open_checked_cache(cfg: TrainConfig, data: PreparedDataset,
                       splits: Sequence[str] = ("train", "valid")) -> tuple[str, dict[str, Any]]:
    """(path, identity) of the run's CLIP cache after checking it was made from this prepared
    dataset version with the run's CLIP model, profile and weights, and holds ``splits``."""
    return data.clip_cache(cfg.cache, cfg.clip.identity(), splits)


def check_resume(checkpoint: dict[str, Any], path: str, cfg: TrainConfig, version: str,
                 cache_identity: dict[str, Any] | None) -> None:
    """BadInputError (one line) unless ``checkpoint`` was made by this trainer on the same
    dataset version, CLIP cache and recipe as this run."""
    if checkpoint.get("format") != FORMAT:
        raise BadInputError(path, "not a salmm training checkpoint (an official release?);"
                            " it can be evaluated but not resumed")
    missing = [k for k in ("config", "dataset_version", "cache_identity", "optim_dict", "epoch",
                           "step", "history", "best", "rng") if k not in checkpoint]
    if missing or not isinstance(checkpoint["config"], dict) \
            or any(k not in checkpoint["config"] for k in RECIPE_FIELDS + ("workers",)):
        raise BadInputError(path, "not a complete salmm training checkpoint (missing"
                            f" {', '.join(missing) or 'config fields'}); it cannot be resumed")
    if checkpoint["dataset_version"] != version:
        raise BadInputError(path, f"trained on prepared dataset version"
                            f" {checkpoint['dataset_version']}, this run's data is version"
                            f" {version}")
    if checkpoint["cache_identity"] != cache_identity:
        raise BadInputError(path, "trained with another CLIP cache (or CLIP mode) than this run")
    old = checkpoint["config"]
    new = cfg.as_dict()
    changed = [f"--{k.replace('_', '-')} {old[k]!r} -> {new[k]!r}" for k in RECIPE_FIELDS
               if old[k] != new[k]]
    if changed:
        raise BadInputError(path, f"trained with other options ({'; '.join(changed)}); resume"
                            " with the same options")


@dataclass
class Inputs:
    """A run's inputs, checked: the prepared data, the CLIP cache (None with inline CLIP) and
    the checkpoint resumed from (None for a new run)."""

    data: PreparedDataset
    cache_path: str | None
    cache_identity: dict[str, Any] | None
    checkpoint: dict[str, Any] | None

    @property
    def version(self) -> str:
        return self.data.version


def open_inputs(cfg: TrainConfig, rt: Runtime) -> Inputs:
    """Every input of the run, checked before anything is built (BadInputError, one line)."""
    data = PreparedDataset.open(cfg.prepared)
    check_prepared(cfg, data)
    cache_path, cache_identity = (open_checked_cache(cfg, data) if cfg.cached_clip
                                  else (None, None))
    checkpoint = load_checkpoint(cfg.resume) if cfg.resume else None
    if checkpoint is not None:
        check_resume(checkpoint, cfg.resume, cfg, data.version, cache_identity)
        if cfg.order == "stream" and (checkpoint["config"]["workers"], checkpoint["world_size"]
                                      ) != (cfg.workers, rt.world_size):
            log.warning("resuming with %d data workers x %d processes, the checkpoint had %d x %d:"
                        " the sample order changes, so the run will not repeat an uninterrupted"
                        " one exactly", cfg.workers, rt.world_size,
                        checkpoint["config"]["workers"], checkpoint["world_size"])
    return Inputs(data, cache_path, cache_identity, checkpoint)


def training_loader(cfg: TrainConfig, rt: Runtime, inputs: Inputs) -> torch.utils.data.DataLoader:
    """The training split's loader in the run's order: a permutation per epoch by random access
    (embeddings preloaded), or streamed shards through a shuffle buffer."""
    shards = inputs.data.shards("train")
    pin = rt.device.type == "cuda"
    if cfg.order == "stream":
        data = SaliencyShards(shards, split="train", train=True, seed=cfg.seed,
                              batch_size=cfg.batch_size, size=cfg.size,
                              shuffle_buffer=cfg.shuffle_buffer, cache_path=inputs.cache_path)
        return make_loader(data, cfg.workers, pin, cfg.seed)
    table = None
    if inputs.cache_path is not None:
        table = EmbeddingTable(inputs.cache_path, "train")
        table.preload()
    reader = SampleReader(shards, inputs.data.index("train"))
    batches = EpochBatches(len(reader), cfg.batch_size, cfg.seed, rt.rank, rt.world_size)
    samples = IndexedSamples(reader, seed=cfg.seed, size=cfg.size, table=table)
    return make_indexed_loader(samples, batches, cfg.workers, pin, cfg.seed)
