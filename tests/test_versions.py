"""``salmm data``: list, diff, reproduce and which on versions normalized here from synthetic
raw data, with the differences made by hand (a changed frame, a frame cut short, another
option), so each expected line is known without the code under test."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.normalize.job import normalize
from salmm import versions

FRAME = "camera_frames/1974/0004.jpg"  # listed in test.json of the 3-video, 4-frame BDDA


def _messages(caplog, level=logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "salmm.data"
            and r.levelno >= level]


@pytest.fixture(scope="module")
def made(synth_dataset, dask_cluster, tmp_path_factory):
    """Versions a (as synthesized), b (one listed frame changed, one more entry whose frame is
    cut short: skipped) and c (a's raw data, another shard size), under one root; the raw
    roots of a and b."""
    work = tmp_path_factory.mktemp("versions")
    raw_a = Path(shutil.copytree(synth_dataset("bdda", videos=3, frames=4), work / "raw-a"))
    raw_b = Path(shutil.copytree(raw_a, work / "raw-b"))
    frame = raw_b / FRAME
    data = bytearray(frame.read_bytes())
    data[len(data) // 2] ^= 1
    frame.write_bytes(bytes(data))
    short = raw_b / "camera_frames/1974/0003.jpg"
    short.write_bytes(short.read_bytes()[:100])
    (raw_b / "test.json").write_text((raw_b / "test.json").read_text() + '"1974/0003.jpg"\n')
    address = dask_cluster.scheduler_address
    ids = {}
    for name, raw, shard_size in (("a", raw_a, 1000), ("b", raw_b, 1000), ("c", raw_a, 2)):
        ids[name] = normalize("bdda", raw, str(work / "prepared" / name), size=(32, 32),
                              shard_size=shard_size, dask_address=address, skip_bad=True,
                              max_bad_fraction=1.0)["version_id"]
    (work / "prepared" / "broken").mkdir()
    (work / "prepared" / "broken" / "manifest.json").write_text("{not json")
    return work, ids, raw_a, raw_b, address


def test_list_names_every_version_and_each_unreadable_manifest_in_one_line(made, caplog,
                                                                          capsys):
    work, ids, *_ = made
    with caplog.at_level(logging.INFO):
        assert versions.main(["list", str(work / "prepared")]) == 0
    rows = [m for m in _messages(caplog) if m[:16] in ids.values()]
    assert sorted(r[:16] for r in rows) == sorted(ids.values())
    row_c = next(r for r in rows if r.startswith(ids["c"]))
    assert "32x32 png, faithful decode, 2 a shard" in row_c and "bdda" in row_c
    assert "1 skipped" in next(r for r in rows if r.startswith(ids["b"]))
    warnings = _messages(caplog, logging.WARNING)
    assert len(warnings) == 1 and "broken/manifest.json: not valid JSON" in warnings[0]
    capsys.readouterr()
    assert versions.main(["list", str(work / "prepared"), "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {v["version_id"] for v in listed} == set(ids.values())
    assert all(len(v["raw_fingerprint"]) == 64 for v in listed)


def test_diff_says_which_raw_files_options_and_skipped_frames_differ(made, caplog):
    work, ids, *_ = made
    prepared = work / "prepared"
    with caplog.at_level(logging.INFO):
        versions.main(["diff", str(prepared / "a"), str(prepared / "b" / "manifest.json")])
    lines = _messages(caplog)
    assert lines[0] == f"A {ids['a']} (bdda, {prepared / 'a'})"
    assert "raw files: 0 added, 0 removed, 2 changed" in lines
    assert f"  changed: {FRAME}, test.json" in lines
    assert any(line.startswith("skipped only in B: 1: 1974/0003.jpg (truncated JPEG")
               for line in lines)
    assert not any(line.startswith("options") for line in lines)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        versions.main(["diff", str(prepared / "a"), str(prepared / "c")])
    lines = _messages(caplog)
    assert "options: shard_size 1000 -> 2" in lines and "raw files: the same" in lines
    caplog.clear()
    with caplog.at_level(logging.INFO):
        versions.main(["diff", str(prepared / "a"), str(prepared / "a")])
    assert _messages(caplog)[-1].startswith("same version")


def test_reproduce_confirms_the_version_or_says_in_one_line_what_differs(made, tmp_path,
                                                                        caplog):
    work, ids, raw_a, raw_b, address = made
    manifest = work / "prepared" / "b" / "manifest.json"
    with caplog.at_level(logging.INFO):
        assert versions.main(["reproduce", str(manifest), "--root", str(raw_b), "--out",
                              str(tmp_path / "again"), "--dask-address", address]) == 0
    assert f"reproduced version {ids['b']} in {tmp_path / 'again'}" in _messages(caplog)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert versions.main(["reproduce", str(manifest), "--root", str(raw_a), "--out",
                              str(tmp_path / "other"), "--dask-address", address]) == 1
    errors = _messages(caplog, logging.ERROR)
    assert len(errors) == 1 and f"not the manifest's {ids['b']}" in errors[0]
    assert f"changed: {FRAME}, test.json" in errors[0]


def test_which_finds_a_checkpoints_version_or_says_it_is_absent(made, tmp_path, caplog):
    work, ids, *_ = made
    ours = tmp_path / "last.pt"
    torch.save({"state_dict": {}, "dataset_version": ids["c"],
                "config": {"prepared": str(tmp_path / "moved-away")}}, ours)
    official = tmp_path / "model_best.tar"
    torch.save({"state_dict": {}, "epoch": 3}, official)
    with caplog.at_level(logging.INFO):
        versions.main(["which", str(ours), "--root", str(work / "prepared")])
        versions.main(["which", str(ours)])
        versions.main(["which", str(official)])
    found, absent, released = _messages(caplog)
    assert found.endswith(f"trained on version {ids['c']}, present at {work / 'prepared' / 'c'}")
    assert f"not present (its run read {tmp_path / 'moved-away'})" in absent
    assert "no data version recorded" in released


def test_a_root_that_is_not_a_folder_is_one_line_and_status_2(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        assert versions.main(["list", str(tmp_path / "nowhere")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "nowhere: not a folder" in errors[0]


def test_normalize_writes_a_dataset_card_whose_command_makes_the_same_version(made, tmp_path):
    import shlex

    import yaml

    from pipeline.cli import main as pipeline_main

    work, ids, *_ = made
    prepared = work / "prepared" / "b"
    card = (prepared / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["pretty_name"] == f"BDDA (salmm prepared, version {ids['b']})"
    assert meta["size_categories"] == ["n<1K"] and "synthetic" in meta["tags"]
    assert "**SYNTHETIC**" in body and "https://deepdrive.berkeley.edu/" in body
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["synthetic"] is True                   # part of the version, said on pictures
    for split, entry in manifest["splits"].items():
        assert (f"| {split} | {entry['samples']} | {len(entry['shards'])} |"
                f" {len(entry['skipped'])} |") in body
    made_with = body.split("**Made with**: `", 1)[1].split("`", 1)[0]
    argv = shlex.split(made_with)[2:]                      # after "salmm normalize"
    argv[argv.index("--root") + 1] = str(made[3])
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    assert pipeline_main(["normalize", *argv, "--dask-address", made[4]]) == 0
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["version_id"] == ids["b"]
