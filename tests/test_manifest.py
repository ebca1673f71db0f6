"""Manifest: version id, reading (with its errors), shard URLs, differences."""

from __future__ import annotations

import json

import pytest

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.formats.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    differences,
    manifest_bytes,
    read_manifest,
    shard_urls,
    version_id,
    write_manifest,
)


def _manifest() -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dataset": "bdda",
        "options": {"size": {"height": 256, "width": 256}, "shard_size": 4},
        "splits": {"valid": {"shards": [{"name": "valid-000000.tar", "samples": 4, "sha256": "ab"},
                                        {"name": "valid-000001.tar", "samples": 2, "sha256": "cd"}],
                             "samples": 6, "skipped": [], "entries": 6}},
    }


def test_version_id_is_16_hex_and_ignores_key_order_and_its_own_field():
    manifest = _manifest()
    vid = version_id(manifest)
    assert len(vid) == 16 and int(vid, 16) >= 0
    reordered = json.loads(json.dumps(manifest, sort_keys=True))
    assert version_id(dict(reversed(list(reordered.items())))) == vid
    assert version_id({**manifest, "version_id": "anything"}) == vid


def test_version_id_changes_with_any_content():
    manifest = _manifest()
    changed = json.loads(json.dumps(manifest))
    changed["splits"]["valid"]["shards"][1]["sha256"] = "ce"
    assert version_id(changed) != version_id(manifest)
    changed = json.loads(json.dumps(manifest))
    changed["options"]["size"]["height"] = 128
    assert version_id(changed) != version_id(manifest)


def test_write_then_read_round_trip(tmp_path):
    manifest = _manifest()
    vid = write_manifest(Folder(tmp_path), manifest)
    read = read_manifest(str(tmp_path))
    assert read["version_id"] == vid == version_id(read)
    assert {k: v for k, v in read.items() if k != "version_id"} == manifest
    assert (tmp_path / MANIFEST).read_bytes() == manifest_bytes(manifest)
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST]


@pytest.mark.parametrize("content, problem", [
    (None, "missing"),
    (b"{not json", "not valid JSON"),
    (b'{"format": "something-else"}', "not a salmm-prepared manifest"),
    (json.dumps({"format": FORMAT, "format_version": 99}).encode(), "format version 99"),
])
def test_read_manifest_errors_are_one_line_naming_the_file(tmp_path, content, problem):
    if content is not None:
        (tmp_path / MANIFEST).write_bytes(content)
    with pytest.raises(BadInputError) as info:
        read_manifest(str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / MANIFEST) in message and problem in message


def test_shard_urls_local_and_fsspec(tmp_path):
    manifest = _manifest()
    assert shard_urls(str(tmp_path), manifest, "valid") == [
        f"{tmp_path}/valid-000000.tar", f"{tmp_path}/valid-000001.tar"]
    assert shard_urls("memory://p/", manifest, "valid")[1] == "memory://p/valid-000001.tar"
    with pytest.raises(KeyError, match="has \\['valid'\\]"):
        shard_urls(str(tmp_path), manifest, "train")


def test_differences_names_each_changed_path():
    old = {"options": {"size": {"height": 256, "width": 256}, "profile": "faithful"}, "a": 1}
    new = {"options": {"size": {"height": 128, "width": 256}, "profile": "faithful"}, "b": 2}
    assert differences(old, new) == ["a: removed", "b: added", "options.size.height: 256 → 128"]
    assert differences(old, old) == []
