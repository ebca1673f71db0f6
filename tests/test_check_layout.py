"""salmm check-layout: a raw root against its split lists, with the expected counts computed
here from the split files and the files removed by hand."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from pipeline import check_layout


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.layout"]


def _listed(root: Path) -> list[str]:
    return [json.loads(line) for split in ("train", "valid", "test")
            if (root / f"{split}.json").exists()
            for line in (root / f"{split}.json").read_text().splitlines() if line.strip()]


def test_a_complete_root_then_missing_frames_and_fixdata(synth_dataset, tmp_path, caplog):
    root = Path(shutil.copytree(synth_dataset("trafficgaze", videos=3, frames=8),
                                tmp_path / "TrafficGaze"))
    names = _listed(root)
    videos = sorted({int(name.split("/")[0]) for name in names})
    present = {p.relative_to(root / "trafficframe").as_posix()
               for p in (root / "trafficframe").rglob("*.jpg")}
    with caplog.at_level(logging.INFO):
        assert check_layout.main(["--dataset", "trafficgaze", "--root", str(root)]) == 0
    lines = _lines(caplog)
    assert lines[1] == (f"trafficframe/: {len(names)} needed, {len(names)} present; "
                        f"{len(present - set(names))} not in any split (e.g. "
                        f"{', '.join(sorted(present - set(names))[:5])})")
    other = sorted({p.name for p in (root / "fixdata").iterdir()}
                   - {f"fixdata{v}.mat" for v in videos})
    assert lines[2] == (f"fixdata/: {len(videos)} needed, {len(videos)} present"
                        + (f"; {len(other)} not in any split (e.g. {', '.join(other[:5])})"
                           if other else ""))
    assert lines[-1] == "complete: ready to normalize"

    gone = sorted(names)[:2]
    for name in gone:
        (root / "trafficframe" / name).unlink()
    (root / "fixdata" / f"fixdata{videos[-1]}.mat").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert check_layout.main(["--dataset", "trafficgaze", "--root", str(root)]) == 1
    lines = _lines(caplog)
    assert f"2 MISSING (first: {gone[0]}, {gone[1]})" in lines[1]
    assert lines[2].startswith(f"fixdata/: {len(videos)} needed, {len(videos) - 1} present,"
                               f" 1 MISSING (first: fixdata{videos[-1]}.mat)")
    assert lines[-1].startswith("INCOMPLETE")


def test_another_datasets_root_is_one_line_and_status_2(bdda_root, caplog):
    with caplog.at_level(logging.INFO):
        assert check_layout.main(["--dataset", "trafficgaze", "--root", str(bdda_root)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "it looks like a BDDA root" in errors[0]
