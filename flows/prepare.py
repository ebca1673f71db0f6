"""The ``prepare`` flow: raw download → verified, versioned shards and CLIP cache.

Tasks, in order: check the raw layout → normalise into shards (per-frame work on Dask) → embed with
CLIP into the Zarr cache → verify → publish. Each task reuses the pipeline's own resume: re-running
after a crash skips completed shards and cache chunks, so tasks are safe to retry. Transient errors
(I/O, lost Dask workers) are retried; bad input (:class:`~pipeline.core.errors.BadInputError`) is not, and
ends the run as Failed with its one-line reason in the run's logs.

Call it as a plain function (Prefect's ephemeral mode) or through the deployments in :mod:`flows.serve`.
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.logging.handlers import APILogHandler

from flows.config import deployment_parameters
from pipeline.core.errors import BadInputError, OutputError
from pipeline.core.fsio import Folder
from pipeline.datasets import check_layout
from pipeline.encoders.clip import (
    DEFAULT_MODEL,
    DEFAULT_PROFILE,
    DEFAULT_WEIGHTS,
    ClipSpec,
    check_weights,
    parse_weights,
)
from pipeline.encoders.embedding import Compute, embed_prepared
from pipeline.formats.clip_cache import open_cache
from pipeline.formats.prepared import PreparedDataset
from pipeline.normalize import normalize, resolve_ground_truth
from pipeline.verify import verify

TRANSIENT = (OSError, TimeoutError, ConnectionError)


def _is_transient(task_obj, task_run, state) -> bool:
    """Retry condition: retry only errors that a second try can fix, never bad input."""
    try:
        state.result()
    except BadInputError:
        return False
    except TRANSIENT:
        return True
    except Exception:  # noqa: BLE001 - anything else is a bug or bad input: do not retry
        return False
    return False


RETRY = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": _is_transient}


@task(name="check-layout")
def check_layout_task(dataset: str, root: str) -> None:
    check_layout(dataset, root)
    get_run_logger().info("%s: raw layout of %s looks right", root, dataset)


@task(name="check-weights")
def check_weights_task(clip_model: str, clip_pretrained: str | None, profile: str) -> None:
    """The CLIP weights can be had (on disk, or their host answers): checked before any work,
    the hint naming the deployment parameter as a run takes it."""
    spec = ClipSpec(clip_model, parse_weights(clip_pretrained), profile)
    check_weights(spec, option="--param clip_pretrained={}")


@task(name="normalize", **RETRY)
def normalize_task(
    dataset: str,
    root: str,
    out: str,
    size: str,
    workers: int | None,
    dask_address: str | None,
    skip_bad: bool,
    max_bad_fraction: float,
    decode: str = "faithful",
    frame_codec: str = "png",
    ground_truth: str | None = None,
) -> dict[str, Any]:
    result = normalize(
        dataset,
        root,
        out,
        size=size,
        decode=decode,
        frame_codec=frame_codec,
        ground_truth=ground_truth,
        workers=workers,
        dask_address=dask_address,
        skip_bad=skip_bad,
        max_bad_fraction=max_bad_fraction,
        progress=False,
    )
    get_run_logger().info(
        "normalised %s into %s: %s samples, %d skipped, version %s",
        dataset,
        out,
        result["samples"],
        result["skipped"],
        result["version_id"],
    )
    return result


@task(name="embed", **RETRY)
def embed_task(
    prepared: str,
    clip_model: str,
    clip_pretrained: str | None,
    profile: str,
    device: str,
    dask_address: str | None,
    workers: int | None = None,
) -> dict[str, Any]:
    spec = ClipSpec(clip_model, parse_weights(clip_pretrained), profile)
    cuda = device.startswith("cuda")
    compute = Compute(device, "fp16" if cuda else "fp32")
    path = embed_prepared(prepared, spec=spec, compute=compute, dask_address=dask_address,
                          workers=None if dask_address else workers)
    identity = open_cache(path, prepared).identity
    get_run_logger().info(
        "CLIP cache %s: %s weights %s, profile %s",
        path,
        identity["encoder"]["model"],
        identity["encoder"]["weights"],
        identity["encoder"]["profile"],
    )
    return {"path": path, "encoder": identity["encoder"]}


@task(name="verify", **RETRY)
def verify_task(prepared: str) -> None:
    problems = verify(prepared)
    if problems:
        raise BadInputError(prepared, f"verification failed: {'; '.join(problems)}")
    get_run_logger().info(
        "%s verifies: every shard and input fingerprint matches the manifest", prepared
    )


@task(name="publish", **RETRY)
def publish_task(
    out: str, dataset: str, normalized: dict[str, Any], cache: dict[str, Any], wall_s: float
) -> dict[str, Any]:
    """Record the finished, verified dataset in ``published.json`` and the run's markdown artifact."""
    splits = PreparedDataset.open(out).manifest["splits"]
    record = {
        "dataset": dataset,
        "version_id": normalized["version_id"],
        "samples": {name: split["samples"] for name, split in splits.items()},
        "skipped": {name: split["skipped"] for name, split in splits.items()},
        "cache": cache,
        "wall_s": round(wall_s, 1),
    }
    Folder(out).write_bytes(
        PUBLISHED, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    )
    create_markdown_artifact(
        markdown=report_markdown(record),
        key=f"prepare-{dataset}",
        description=f"{dataset} prepared data, version {record['version_id']}",
    )
    get_run_logger().info("published %s version %s", dataset, record["version_id"])
    return record


PUBLISHED = "published.json"


def report_markdown(record: dict[str, Any]) -> str:
    """The run's artifact: counts per split, skipped frames and reasons, version, cache, wall time."""
    lines = [
        f"# prepare/{record['dataset']}",
        "",
        f"- version id: `{record['version_id']}`",
        (
            f"- CLIP cache: `{record['cache']['path']}` ({record['cache']['encoder']['model']}, weights "
            f"`{record['cache']['encoder']['weights']}`, profile `{record['cache']['encoder']['profile']}`)"
        ),
        f"- wall time: {record['wall_s']:.1f} s",
        "",
        "| split | samples | skipped |",
        "| --- | ---: | ---: |",
    ]
    for split, samples in record["samples"].items():
        lines.append(f"| {split} | {samples} | {len(record['skipped'][split])} |")
    skipped = [(split, item) for split, items in record["skipped"].items() for item in items]
    if skipped:
        lines += [
            "",
            "## Skipped frames",
            "",
            "| split | frame | file | problem |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {split} | {item['name']} | {item['file']} | {item['problem']} |"
            for split, item in skipped
        ]
    return "\n".join(lines) + "\n"


@flow(name="prepare", log_prints=False)
def prepare(
    dataset: str,
    root: str | None = None,
    out: str | None = None,
    size: str = "256x256",
    decode: str = "faithful",
    frame_codec: str = "png",
    clip_model: str = DEFAULT_MODEL,
    clip_pretrained: str | None = DEFAULT_WEIGHTS,
    profile: str = DEFAULT_PROFILE,
    device: str = "cpu",
    dask_address: str | None = None,
    workers: int | None = None,
    skip_bad: bool = False,
    max_bad_fraction: float = 0.01,
    ground_truth: str | None = None,
) -> dict[str, Any]:
    """Prepare one dataset: check layout → normalise → embed → verify → publish.

    Args:
        dataset: "trafficgaze", "drfixd-rainy", "bdda", "dreyeve" or "dada". root: the raw
            download folder.
        out: the prepared folder (local path or fsspec URL). root / out None: the configured
            defaults where the run executes (:mod:`flows.config`: ``.salmm/flows.toml``,
            ``SALMM_DATA_ROOT``, ``SALMM_PREPARED_ROOT``; what ``flows/prefect.yaml``'s
            deployments rely on, so a worker's machine decides where its data is). size: frame size "WIDTHxHEIGHT".
        decode: how frames and gaze maps are decoded, "faithful" (as the published loader) or
            "fast" (reduced-scale JPEG decoding; see ``python -m pipeline normalize --decode``).
        frame_codec: how frames are stored, "png" (lossless, the published loader's pixels) or
            "jpeg95" (smaller, lossy; see ``python -m pipeline normalize --frame-codec``).
        clip_model / clip_pretrained / profile / device: the CLIP encoder of the cache
            (clip_pretrained: "openai", a local weight file, "hf-hub:...", or "none" for random weights).
        dask_address: an existing Dask scheduler; None starts a local cluster of ``workers`` processes.
        skip_bad / max_bad_fraction: skip-and-report bad frames, failing above this fraction.
        ground_truth: DR(eye)VE's gaze maps, "saliency_fix" (None: the default) or "saliency".

    Returns:
        The published record (also written to ``<out>/published.json``).
    """
    started = time.perf_counter()
    logger = get_run_logger()
    try:
        if root is None or out is None:
            configured = deployment_parameters(dataset)
            root, out = root or configured["root"], out or configured["out"]
            ground_truth = ground_truth or configured["ground_truth"]
        try:
            resolve_ground_truth(dataset, ground_truth)
        except ValueError as err:
            raise BadInputError("--param ground_truth", str(err)) from None
        check_layout_task(dataset, root)
        check_weights_task(clip_model, clip_pretrained, profile)
        return _prepare(dataset, root, out, size, decode, frame_codec, clip_model,
                        clip_pretrained, profile, device, dask_address, workers, skip_bad,
                        max_bad_fraction, ground_truth, started)
    except (BadInputError, OutputError) as err:
        logger.error("%s", err)             # the reason, on the run's own log and --watch screen
        APILogHandler().flush()             # sent before the run turns Failed and --watch stops
        raise


def _prepare(dataset: str, root: str, out: str, size: str, decode: str, frame_codec: str,
             clip_model: str, clip_pretrained: str | None, profile: str, device: str,
             dask_address: str | None, workers: int | None, skip_bad: bool,
             max_bad_fraction: float, ground_truth: str | None, started: float
             ) -> dict[str, Any]:
    normalized = normalize_task(
        dataset, root, out, size, workers, dask_address, skip_bad, max_bad_fraction, decode,
        frame_codec, ground_truth
    )
    cache = embed_task(out, clip_model, clip_pretrained, profile, device, dask_address, workers)
    verify_task(out)
    return publish_task(out, dataset, normalized, cache, time.perf_counter() - started)
