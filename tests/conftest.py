"""Shared fixtures: small raw datasets in the real download layouts, made in temp folders.

* ``synth_dataset`` (session-scoped factory): ``synth_dataset("bdda", videos=3, frames=8,
  seed=0, mat_format="v5")`` -> root of a synthetic dataset made by :mod:`pipeline.synth`,
  made once per argument set. Shared: treat it as read-only.
* ``trafficgaze_root``, ``drfixd_root``, ``bdda_root`` (session): the default 3-video x
  8-frame synthetic datasets (one video per split, frames 6..8 / 4..8 listed).
* ``commands_prepared`` (session): a synthetic BDDA dataset prepared with the real commands
  (:func:`tests._prepared.prepare_with_commands`: synth, normalize, embed), made once and
  shared by the trainer's tests. Read-only: the session fails if a test changed it.
* ``copy_dataset`` (function-scoped): ``copy_dataset(root)`` -> a private writable copy,
  for tests that damage files.
* ``dask_cluster`` (module): an in-process Dask cluster to pass by address.
* ``tiny_raw`` (function-scoped factory): a minimal hand-written dataset with chosen
  fixdata cells and tiny JPEGs, for tests that need exact control (bad-input cases).

The model's thread governor (:mod:`pipeline.core.cpu`) is off in the test process: it follows the
machine's load, and results must not (torch rounds differently with the thread count). Its
decisions are tested on a simulated machine in ``test_cpu.py``; child processes get
``OMP_NUM_THREADS=1`` where they compute with torch.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core import cpu
from pipeline.datasets.matfile import write_fixdata
from pipeline.datasets.splits import write_split
from pipeline.synth import write_dataset


def _tiny_jpeg(seed: int, size: tuple[int, int] | None = None, gray: bool = False) -> bytes:
    """A small-file JPEG of a real frame's size (1280x720; a BDDA gaze map's 1024x576 when
    ``gray``): a seeded 16x9 random pattern blown up, so each frame differs and stays cheap."""
    size = size or ((576, 1024) if gray else (720, 1280))
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (9, 16) if gray else (9, 16, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size[1], size[0]), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_tiny_dataset(
    root: Path,
    dataset: str,
    cells: dict[int, Sequence[np.ndarray]] | None = None,
    *,
    frames: dict[int, int] | None = None,
    splits: dict[str, list[int]] | None = None,
    mat_format: str = "v5",
) -> Path:
    """Write a minimal dataset: every frame of every video listed in the split of its video.

    Args:
        root: dataset root to create.
        dataset: "trafficgaze", "drfixd-rainy" or "bdda".
        cells: TrafficGaze/DrFixD: fixdata cells per video (frames default to one per cell).
        frames: frames per video (BDDA; or to override the cell count).
        splits: videos per split; default: the first video in train, the second in valid,
            the rest in test.
        mat_format: "v5" or "v7.3".
    """
    cells = cells or {}
    frames = frames or {video: len(video_cells) for video, video_cells in cells.items()}
    videos = sorted(frames)
    splits = splits or {"train": videos[:1], "valid": videos[1:2], "test": videos[2:]}
    root.mkdir(parents=True)
    bdda = dataset == "bdda"
    vfmt, ffmt = ("{:04d}", "{:04d}") if bdda else ("{:02d}", "{:06d}")
    for video, count in frames.items():
        for number in range(1, count + 1):
            name = f"{vfmt.format(video)}/{ffmt.format(number)}.jpg"
            folders = ("camera_frames", "gazemap_frames") if bdda else ("trafficframe",)
            for folder in folders:
                path = root / folder / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(_tiny_jpeg(video * 1000 + number, gray=folder == "gazemap_frames"))
    if not bdda:
        (root / "fixdata").mkdir()
        for video, video_cells in cells.items():
            write_fixdata(root / "fixdata" / f"fixdata{video}.mat", video_cells, mat_format)
    for split in ("train", "valid", "test"):
        names = [f"{vfmt.format(video)}/{ffmt.format(number)}.jpg"
                 for video in splits.get(split, []) for number in range(1, frames[video] + 1)]
        write_split(root / f"{split}.json", names)
    return root


@pytest.fixture(scope="module")
def dask_cluster():
    """An already-running in-process Dask cluster (two single-threaded workers), for code
    that is given a scheduler address."""
    import logging

    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"},
                      silence_logs=logging.ERROR) as local:
        yield local


@pytest.fixture(autouse=True, scope="session")
def fixed_threads():
    """Torch's thread count stays where it is for the whole session (no governor)."""
    import torch

    cpu.set_threads(torch.get_num_threads())


@pytest.fixture
def tiny_raw(tmp_path: Path) -> Callable[..., Path]:
    """Factory ``tiny_raw(dataset, cells=..., frames=..., splits=..., mat_format=...)`` -> root."""
    counter = iter(range(1_000_000))

    def make(dataset: str, cells=None, **kwargs) -> Path:
        return write_tiny_dataset(tmp_path / f"{dataset}-{next(counter)}", dataset, cells, **kwargs)

    return make


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory ``synth_dataset(dataset, *, videos, frames, seed, mat_format)`` -> root."""
    made: dict[tuple, Path] = {}

    def make(dataset: str, *, videos: int = 3, frames: int = 8, seed: int = 0,
             mat_format: str = "v5") -> Path:
        key = (dataset, videos, frames, seed, mat_format)
        if key not in made:
            name = f"{dataset}-{videos}x{frames}-{seed}-{mat_format}"
            out = tmp_path_factory.mktemp("synth") / name
            made[key] = write_dataset(dataset, out, videos=videos, frames=frames, seed=seed,
                                      mat_format=mat_format)
        return made[key]

    return make


@pytest.fixture(scope="session")
def trafficgaze_root(synth_dataset: Callable[..., Path]) -> Path:
    return synth_dataset("trafficgaze")


@pytest.fixture(scope="session")
def drfixd_root(synth_dataset: Callable[..., Path]) -> Path:
    return synth_dataset("drfixd-rainy")


@pytest.fixture(scope="session")
def bdda_root(synth_dataset: Callable[..., Path]) -> Path:
    return synth_dataset("bdda")


def _tree_state(root: Path) -> list[tuple[str, int, int]]:
    """(relative path, bytes, mtime ns) of every file under ``root``."""
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def commands_prepared(tmp_path_factory: pytest.TempPathFactory):
    from tests._prepared import prepare_with_commands

    prepared = prepare_with_commands(tmp_path_factory.mktemp("commands"))
    before = _tree_state(prepared)
    yield prepared
    assert _tree_state(prepared) == before, f"a test changed the shared dataset {prepared}"


@pytest.fixture
def copy_dataset(tmp_path: Path) -> Callable[[Path], Path]:
    """``copy_dataset(root)`` -> a writable copy of a (shared) dataset root in ``tmp_path``."""

    def copy(root: Path) -> Path:
        return Path(shutil.copytree(root, tmp_path / f"copy-of-{root.name}"))

    return copy
