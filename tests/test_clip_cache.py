"""The CLIP cache store on its own (no encoder): layout, resume, and every refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from pipeline.core.errors import BadInputError
from pipeline.formats.clip_cache import FORMAT, FORMAT_VERSION, CacheWriter, check_cache, open_cache
from pipeline.formats.manifest import version_id

DIM = 8
def _split(name: str, samples: int) -> dict:
    return {"samples": samples, "shards": [{"name": f"{name}-000000.tar", "samples": samples,
                                            "sha256": "0" * 64}]}


MANIFEST = {"format": "salmm-prepared", "format_version": 2, "dataset": "bdda",
            "options": {"size": {"height": 256, "width": 256}},
            "splits": {"train": _split("train", 5), "valid": _split("valid", 3)}}
OTHER_MANIFEST = {**MANIFEST, "dataset": "trafficgaze"}


def header(**changes):
    base = {
        "encoder": {"model": "ViT-B-32", "weights": "random:seed=0", "profile": "salmm",
                    "activation": "quickgelu", "open_clip": "3.3.0", "embed_dim": DIM},
        "dtype": "float32",
        "compute": {"device": "cpu", "autocast": "fp32"},
        "prepared": {"version_id": version_id(MANIFEST), "manifest_sha256": "0" * 64},
        "software": {"torch": "2", "open_clip": "3.3.0"},
        "splits": {"train": 5, "valid": 3},
        "chunk_size": 2,
    }
    return {**base, **changes}


def fake(split: str, start: int, stop: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng([sum(map(ord, split)), start])
    keys = [f"{split}_{i:04d}" for i in range(start, stop)]
    return keys, rng.standard_normal((stop - start, 2, DIM)).astype(np.float32)


def expected(split: str, n: int, chunk: int = 2) -> np.ndarray:
    """What ``write_all`` stores for ``split`` with ``n`` samples: [n, 2, DIM]."""
    return np.concatenate([fake(split, a, min(a + chunk, n))[1] for a in range(0, n, chunk)])


def write_all(writer: CacheWriter, skip: set[tuple[str, int]] = frozenset()) -> None:
    for split in writer.header["splits"]:
        for index in writer.missing_chunks(split):
            if (split, index) not in skip:
                writer.write_chunk(split, index, *fake(split, *writer.chunk_range(split, index)))


def test_round_trip_layout_and_reader(tmp_path):
    path = tmp_path / "c.zarr"
    writer = CacheWriter.open(path, header())
    assert writer.missing_chunks("train") == [0, 1, 2]
    write_all(writer)
    writer.finish()

    cache = open_cache(path, prepared=MANIFEST)
    keys, emb = cache.load_split("train")
    want_keys = [f"train_{i:04d}" for i in range(5)]
    assert keys == want_keys
    assert emb.dtype == np.float32 and emb.shape == (5, 2, DIM)
    np.testing.assert_array_equal(emb[2:4], fake("train", 2, 4)[1])
    np.testing.assert_array_equal(cache.get("valid_0002"), fake("valid", 2, 3)[1][0])
    assert cache.identity["encoder"]["model"] == "ViT-B-32"
    assert "complete" not in cache.identity
    with pytest.raises(KeyError):
        cache.get("nope")

    group = zarr.open_group(str(path), mode="r")
    assert group["train/embeddings"].chunks == (2, 2, DIM)
    assert group["train/done"][:].tolist() == [1, 1, 1]
    assert group.attrs["complete"] is True


def test_float16_store_reads_back_as_float32(tmp_path):
    writer = CacheWriter.open(tmp_path / "c.zarr", header(dtype="float16"))
    write_all(writer)
    writer.finish()
    _, emb = open_cache(tmp_path / "c.zarr").load_split("valid")
    assert emb.dtype == np.float32
    np.testing.assert_allclose(emb, expected("valid", 3), rtol=1e-3, atol=1e-3)
    assert not np.array_equal(emb, expected("valid", 3))


def test_incomplete_store_is_refused_and_resumes_only_missing_chunks(tmp_path):
    path = tmp_path / "c.zarr"
    writer = CacheWriter.open(path, header())
    write_all(writer, skip={("train", 1), ("valid", 0)})
    with pytest.raises(ValueError, match="missing"):
        writer.finish()
    with pytest.raises(BadInputError, match="incomplete") as err:
        open_cache(path)
    assert "\n" not in str(err.value)

    (path / "train" / "embeddings" / "junk.partial").write_bytes(b"half a chunk")
    resumed = CacheWriter.open(path, header())
    assert resumed.missing_chunks("train") == [1]
    assert resumed.missing_chunks("valid") == [0]
    assert not list(path.rglob("*.partial"))
    write_all(resumed)
    resumed.finish()
    np.testing.assert_array_equal(open_cache(path).load_split("train")[1], expected("train", 5))


def test_store_killed_while_being_created_is_completed_on_resume(tmp_path):
    path = tmp_path / "c.zarr"
    root = zarr.create_group(str(path), attributes={"format": FORMAT,
                                                    "format_version": FORMAT_VERSION,
                                                    **header(), "complete": False})
    root.create_group("train").create_array("keys", shape=(5,), chunks=(2,), dtype=str)
    writer = CacheWriter.open(path, header())
    assert writer.missing_chunks("train") == [0, 1, 2]
    write_all(writer)
    writer.finish()
    np.testing.assert_array_equal(open_cache(path).load_split("valid")[1], expected("valid", 3))


@pytest.mark.parametrize("change, field", [
    ({"encoder": {**header()["encoder"], "model": "ViT-B-16"}}, "encoder.model"),
    ({"encoder": {**header()["encoder"], "weights": "openai"}}, "encoder.weights"),
    ({"encoder": {**header()["encoder"], "profile": "openclip"}}, "encoder.profile"),
    ({"prepared": {"version_id": "0123456789abcdef", "manifest_sha256": "0" * 64}},
     "prepared.version_id"),
    ({"dtype": "float16"}, "dtype"),
])
def test_resume_into_a_store_made_otherwise_is_refused(tmp_path, change, field):
    path = tmp_path / "c.zarr"
    write_all(CacheWriter.open(path, header()), skip={("train", 2)})
    with pytest.raises(BadInputError, match=f"cannot resume.*{field}") as err:
        CacheWriter.open(path, header(**change))
    assert "\n" not in str(err.value)


def test_readers_refuse_another_dataset_version(tmp_path):
    path = tmp_path / "c.zarr"
    writer = CacheWriter.open(path, header())
    write_all(writer)
    writer.finish()
    with pytest.raises(BadInputError, match="version") as err:
        open_cache(path, prepared=OTHER_MANIFEST)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    cache = open_cache(path)
    with pytest.raises(BadInputError, match="version"):
        check_cache(cache, OTHER_MANIFEST)
    check_cache(cache, MANIFEST, model="ViT-B-32", profile="salmm")
    with pytest.raises(BadInputError, match="profile 'salmm'"):
        check_cache(cache, MANIFEST, profile="openclip")
    with pytest.raises(BadInputError, match="model"):
        check_cache(cache, MANIFEST, model="RN50")


def test_readers_refuse_a_prepared_folder_of_another_version(tmp_path):
    from pipeline.core.fsio import Folder
    from pipeline.formats.manifest import write_manifest

    prepared = tmp_path / "prepared"
    Folder(prepared).makedirs()
    write_manifest(Folder(prepared), OTHER_MANIFEST)
    writer = CacheWriter.open(tmp_path / "c.zarr", header())
    write_all(writer)
    writer.finish()
    with pytest.raises(BadInputError, match="prepared dataset is version"):
        open_cache(tmp_path / "c.zarr", prepared=prepared)


def test_missing_and_foreign_stores_are_refused(tmp_path):
    with pytest.raises(BadInputError, match="no CLIP cache"):
        open_cache(tmp_path / "absent.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(BadInputError, match="not a salmm CLIP cache"):
        open_cache(tmp_path / "other.zarr")
    with pytest.raises(BadInputError, match="not a salmm CLIP cache"):
        CacheWriter.open(tmp_path / "other.zarr", header())


def test_write_chunk_checks_shape_and_values(tmp_path):
    writer = CacheWriter.open(tmp_path / "c.zarr", header())
    keys, emb = fake("train", 0, 2)
    with pytest.raises(ValueError, match="needs 2 keys"):
        writer.write_chunk("train", 0, keys[:1], emb[:1])
    with pytest.raises(ValueError, match="needs 2 keys"):
        writer.write_chunk("train", 0, keys, emb[:, :1])
    emb[1, 0, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        writer.write_chunk("train", 0, keys, emb)
    assert writer.missing_chunks("train") == [0, 1, 2]


def _tamper(store, split: str, array: str, edit) -> None:
    """Rewrite one array's zarr.json with ``edit(meta)`` applied (the header stays as it was)."""
    meta_path = store / split / array / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))


def _chunks(meta, shape):
    meta["chunk_grid"]["configuration"]["chunk_shape"] = shape


def _codec(meta, name):
    meta["codecs"][-1]["name"] = name


@pytest.mark.parametrize("array, edit, message", [
    ("embeddings", lambda m: m.update(shape=[2 ** 40, 2, DIM]), r"shape \[1099511627776, 2, 8\]"),
    ("embeddings", lambda m: _chunks(m, [2 ** 31, 2, DIM]), r"in chunks \[2147483648, 2, 8\]"),
    ("embeddings", lambda m: m.update(data_type="complex128", fill_value=[0.0, 0.0]),
     "dtype complex128"),
    ("embeddings", lambda m: _codec(m, "no-such-codec"), "unreadable array metadata"),
    ("keys", lambda m: m.update(shape=[2 ** 40]), r"shape \[1099511627776\]"),
    ("done", lambda m: m.update(data_type="float64", fill_value=0.0), "dtype float64"),
], ids=["huge-shape", "huge-chunks", "complex", "unknown-codec", "keys-shape", "done-dtype"])
def test_tampered_array_metadata_is_refused_before_any_read(tmp_path, array, edit, message):
    path = tmp_path / "c.zarr"
    writer = CacheWriter.open(path, header())
    write_all(writer)
    writer.finish()
    _tamper(path, "train", array, edit)
    with pytest.raises(BadInputError, match=message) as err:
        open_cache(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("change", [{"chunk_size": 2 ** 31}, {"splits": {"train": 2 ** 40}},
                                    {"splits": {"../../elsewhere": 1}},
                                    {"splits": {"train": -1}}, {"dtype": "complex128"},
                                    {"encoder": {"embed_dim": "eight"}}])
def test_tampered_header_numbers_are_refused(tmp_path, change):
    path = tmp_path / "c.zarr"
    writer = CacheWriter.open(path, header())
    write_all(writer)
    writer.finish()
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"].update(change)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BadInputError, match="malformed cache header"):
        open_cache(path)
