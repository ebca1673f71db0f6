"""The training data pipeline: decoding, seeded shuffles and flips, the embedding join, the
split by worker and by rank, and its errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from pipeline.core.errors import BadInputError
from pipeline.formats.clip_cache import open_cache
from pipeline.formats.manifest import read_manifest
from pipeline.formats.shard_index import SampleReader, read_index
from pipeline.formats.shards import split_shards
from salmm.data.stages import (
    EmbeddingTable,
    EpochBatches,
    IndexedSamples,
    SaliencyShards,
    epoch_permutation,
    flip_decision,
    make_indexed_loader,
    make_loader,
    read_shards,
)
from tests._prepared import FAKE_DIM, fake_embedding, write_fake_cache, write_prepared

SIZE = (32, 32)
COUNTS = {"train": [5, 4, 3], "valid": [4]}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = write_prepared(tmp_path_factory.mktemp("data") / "prepared", COUNTS, SIZE)
    cache = write_fake_cache(root, root.parent / "cache.zarr")
    return root, cache


def dataset(prepared, split="train", *, cache=True, batch_size=4, **kw) -> SaliencyShards:
    root, cache_path = prepared
    shards = split_shards(str(root), read_manifest(str(root)), split)
    return SaliencyShards(shards, split=split, train=split == "train", seed=kw.pop("seed", 42),
                          batch_size=batch_size, size=SIZE, shuffle_buffer=kw.pop("buffer", 8),
                          cache_path=str(cache_path) if cache else None, **kw)


def epoch_samples(ds: SaliencyShards, epoch: int, workers: int = 0) -> list[dict]:
    """Every sample of one epoch, in delivery order, unbatched."""
    ds.set_epoch(epoch)
    out = []
    for batch in make_loader(ds, workers, pin_memory=False):
        for i, key in enumerate(batch["key"]):
            out.append({name: (value[i] if name != "key" else key) for name, value in batch.items()})
    return out


def raw_samples(prepared, split="train") -> dict[str, dict]:
    root, _ = prepared
    return {s["__key__"]: s for s in read_shards(split_shards(str(root),
                                                              read_manifest(str(root)), split))}


def test_decode_gives_the_stored_uint8_frames_and_labels_exactly(prepared):
    raw = raw_samples(prepared, "valid")
    batch = next(iter(dataset(prepared, "valid")))
    assert batch["frame"].dtype == torch.uint8 and batch["frame"].shape == (4, 3, *SIZE)
    assert batch["label"].dtype == torch.float32 and batch["label"].shape == (4, 1, *SIZE)
    assert not batch["flipped"].any()
    for i, key in enumerate(batch["key"]):
        rgb = np.asarray(Image.open(io.BytesIO(raw[key]["png"])).convert("RGB"))
        np.testing.assert_array_equal(batch["frame"][i].numpy(), rgb.transpose(2, 0, 1))
        gaze = np.asarray(Image.open(io.BytesIO(raw[key]["gaze.png"]))).astype(np.float32)
        np.testing.assert_array_equal(batch["label"][i, 0].numpy(), gaze / 255)
        assert batch["label"][i].max() > 0.9


def test_validation_keeps_manifest_order_without_flips(prepared):
    keys = [s["key"] for s in epoch_samples(dataset(prepared, "valid"), 0)]
    assert keys == list(raw_samples(prepared, "valid"))


def test_epoch_is_a_function_of_seed_and_epoch(prepared):
    ds = dataset(prepared)
    first = epoch_samples(ds, 3)
    again = epoch_samples(dataset(prepared), 3)
    assert [s["key"] for s in first] == [s["key"] for s in again]
    for a, b in zip(first, again):
        assert bool(a["flipped"]) == bool(b["flipped"])
        assert torch.equal(a["frame"], b["frame"]) and torch.equal(a["label"], b["label"])
    # every sample exactly once, and another epoch is in another order or flipped otherwise
    assert sorted(s["key"] for s in first) == sorted(raw_samples(prepared))
    other = epoch_samples(ds, 4)
    assert ([(s["key"], bool(s["flipped"])) for s in other]
            != [(s["key"], bool(s["flipped"])) for s in first])
    assert ([s["key"] for s in epoch_samples(dataset(prepared, seed=7), 3)]
            != [s["key"] for s in first])


def test_flip_moves_frame_and_label_together_and_picks_the_flipped_embedding(prepared):
    raw = raw_samples(prepared)
    samples = epoch_samples(dataset(prepared), 0)
    flipped = [s for s in samples if s["flipped"]]
    assert 0 < len(flipped) < len(samples)
    for s in samples:
        rgb = np.asarray(Image.open(io.BytesIO(raw[s["key"]]["png"])).convert("RGB"))
        want = rgb.transpose(2, 0, 1)
        want = want[:, :, ::-1] if s["flipped"] else want
        np.testing.assert_array_equal(s["frame"].numpy(), want)
        bright = s["label"][0].sum(0).argmax().item()   # the blob is left of centre unflipped
        assert (bright > SIZE[1] // 2) == bool(s["flipped"])
        assert bool(s["flipped"]) == flip_decision(42, 0, s["key"])
        np.testing.assert_array_equal(s["emb"].numpy(), fake_embedding(s["key"],
                                                                        bool(s["flipped"])))


def test_flip_decisions_are_fair_and_vary_with_epoch():
    keys = [f"v{i:04d}_f000001" for i in range(2000)]
    share = np.mean([flip_decision(42, 0, k) for k in keys])
    assert 0.45 < share < 0.55
    changed = np.mean([flip_decision(42, 0, k) != flip_decision(42, 1, k) for k in keys])
    assert 0.4 < changed < 0.6


def test_inline_mode_batches_have_no_embeddings(prepared):
    batch = next(iter(dataset(prepared, cache=False)))
    assert "emb" not in batch


def test_workers_split_shards_deterministically_and_count_batches(prepared):
    ds = dataset(prepared)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        batches = list(make_loader(ds, 2, pin_memory=False))
        assert len(batches) == ds.batches_in_epoch(epoch, num_workers=2)
        keys = [k for b in batches for k in b["key"]]
        assert sorted(keys) == sorted(raw_samples(prepared))
        again = epoch_samples(dataset(prepared), epoch, workers=2)
        assert keys == [s["key"] for s in again]
    assert ds.batches_in_epoch(0, num_workers=0) == 3      # 12 samples, batch 4, one worker


def test_persistent_workers_follow_set_epoch(prepared):
    ds = dataset(prepared)
    loader = make_loader(ds, 1, pin_memory=False)
    seen = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        seen.append([(k, bool(f)) for b in loader for k, f in zip(b["key"], b["flipped"])])
    assert seen[0] == seen[2] != seen[1]
    assert seen[0] == [(s["key"], bool(s["flipped"])) for s in epoch_samples(dataset(prepared), 0)]


def test_ranks_read_disjoint_shards_that_cover_the_split(prepared, monkeypatch):
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = dataset(prepared)
        samples = epoch_samples(ds, 2)
        assert len(samples) == ds.samples_in_epoch(rank, 2, epoch=2)
        batches = -(-len(samples) // 4)
        assert batches == ds.batches_in_epoch(2, num_workers=0, rank=rank, world_size=2)
        per_rank.append({s["key"] for s in samples})
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == set(raw_samples(prepared))


def test_embedding_table_loads_lazily_and_pickles_empty(prepared):
    import pickle

    _, cache = prepared
    table = EmbeddingTable(str(cache), "valid")
    key, sample = next(iter(raw_samples(prepared, "valid").items()))
    row = sample["__index__"]
    np.testing.assert_array_equal(table.lookup(row, key, True), fake_embedding(key, True))
    assert table.lookup(row, key, False).shape == (FAKE_DIM,)
    clone = pickle.loads(pickle.dumps(table))
    assert clone._cache is None and not clone._lru and clone.cache_path == str(cache)
    with pytest.raises(BadInputError, match="no embedding for sample nope"):
        table.lookup(999, "nope", False)
    with pytest.raises(BadInputError, match=f"row {row} of split valid holds sample {key},"
                                            " the shards have nope there"):
        table.lookup(row, "nope", False)


class CountingStore(zarr.storage.WrapperStore):
    """A zarr store that counts the embedding chunks read through it."""

    def __init__(self, store) -> None:
        super().__init__(store)
        self.chunk_reads: list[str] = []

    async def get(self, key, prototype, byte_range=None):
        if "/embeddings/c/" in key:
            self.chunk_reads.append(key)
        return await super().get(key, prototype, byte_range)


@pytest.mark.parametrize("shard", [0, 1, 2])
def test_lookup_reads_only_the_chunks_of_the_shard_read_and_equals_the_whole_split(
        tmp_path, shard):
    root = write_prepared(tmp_path / "p", {"train": [7, 5, 6]}, SIZE)
    cache = write_fake_cache(root, tmp_path / "c.zarr", chunk=3)     # 18 rows: chunks of 3
    store = CountingStore(zarr.storage.LocalStore(str(cache), read_only=True))
    table = EmbeddingTable(store, "train")
    shards = split_shards(str(root), read_manifest(str(root)), "train")
    keys, whole = open_cache(cache).load_split("train")             # the whole-split table
    assert [s["__key__"] for s in read_shards(shards)] == keys
    for sample in read_shards([shards[shard]]):
        row = sample["__index__"]
        for flipped in (False, True):
            got = table.lookup(row, sample["__key__"], flipped)
            np.testing.assert_array_equal(got, whole[row, int(flipped)])
    first, end = shards[shard].first, shards[shard].end
    wanted = {f"train/embeddings/c/{i}/0/0" for i in range(first // 3, (end - 1) // 3 + 1)}
    assert set(store.chunk_reads) == wanted and len(store.chunk_reads) == len(wanted)
    assert table.reads == len(wanted)


def test_wrong_frame_size_is_refused_with_the_shard_and_key(prepared):
    root, _ = prepared
    shards = split_shards(str(root), read_manifest(str(root)), "valid")
    ds = SaliencyShards(shards, split="valid", train=False, seed=0, batch_size=2, size=(64, 64))
    with pytest.raises(BadInputError, match=r"valid-000000\.tar: sample v0012_f000001: png is"
                                            r" 32x32, the run expects 64x64"):
        next(iter(ds))


def test_missing_shard_is_named(prepared, tmp_path):
    root = write_prepared(tmp_path / "p", {"train": [2, 2], "valid": [1]}, SIZE)
    (root / "train-000001.tar").unlink()
    ds = SaliencyShards(split_shards(str(root), read_manifest(str(root)), "train"),
                        split="train", train=False, seed=0, batch_size=8, size=SIZE)
    with pytest.raises(BadInputError, match=r"train-000001\.tar: shard listed in the manifest"):
        list(ds)


# ---- a permutation per epoch (the default training order) -------------------------------------


def permuted(prepared, *, workers=0, seed=42, rank=0, world_size=1, batch_size=4):
    """(loader, batches) of the train split in the permutation order."""
    root, cache = prepared
    manifest = read_manifest(str(root))
    reader = SampleReader(split_shards(str(root), manifest, "train"),
                          read_index(str(root), manifest, "train"))
    table = EmbeddingTable(str(cache), "train")
    table.preload()
    batches = EpochBatches(len(reader), batch_size, seed, rank, world_size)
    samples = IndexedSamples(reader, seed=seed, size=SIZE, table=table)
    return make_indexed_loader(samples, batches, workers, pin_memory=False), batches


def permuted_epoch(loader, batches, epoch) -> list[tuple[str, bool, int]]:
    batches.set_epoch(epoch)
    return [(k, bool(f), len(b["key"])) for b in loader for k, f in zip(b["key"], b["flipped"])]


def test_permutation_reads_every_sample_once_in_an_order_drawn_from_seed_and_epoch(prepared):
    raw = raw_samples(prepared)
    keys = list(raw)                                          # split order
    loader, batches = permuted(prepared, batch_size=5)
    first = permuted_epoch(loader, batches, 0)
    assert sorted(k for k, _, _ in first) == sorted(keys)    # each sample once
    want = [keys[row] for row in epoch_permutation(len(keys), 42, 0)]
    assert [k for k, _, _ in first] == want                  # the (seed, epoch) permutation
    assert [n for _, _, n in first] == [5] * 10 + [2] * 2 and len(batches) == 3  # short last
    assert all(f == flip_decision(42, 0, k) for k, f, _ in first)
    second = permuted_epoch(loader, batches, 1)
    assert [k for k, _, _ in second] != [k for k, _, _ in first]
    assert permuted_epoch(loader, batches, 0) == first       # the same epoch again: the same
    # any number of workers, a new loader (a resumed run): the same batches
    again, again_batches = permuted(prepared, workers=2, batch_size=5)
    assert permuted_epoch(again, again_batches, 1) == second
    other, other_batches = permuted(prepared, seed=7, batch_size=5)
    assert [k for k, _, _ in permuted_epoch(other, other_batches, 0)] != want


def test_permutation_batches_hold_the_stored_bytes_and_the_matching_embedding(prepared):
    raw = raw_samples(prepared)
    loader, batches = permuted(prepared)
    batches.set_epoch(3)
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            rgb = np.asarray(Image.open(io.BytesIO(raw[key]["png"])).convert("RGB"))
            want = rgb.transpose(2, 0, 1)
            flipped = bool(batch["flipped"][i])
            want = want[:, :, ::-1] if flipped else want
            np.testing.assert_array_equal(batch["frame"][i].numpy(), want)
            np.testing.assert_array_equal(batch["emb"][i].numpy(), fake_embedding(key, flipped))
            assert batch["index"][i] == raw[key]["__index__"]


def test_permutation_ranks_take_disjoint_equal_shares():
    shares = [EpochBatches(11, 2, 42, rank, 3).rows(5) for rank in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]             # 11 // 3: same steps everywhere
    assert len(set(np.concatenate(shares).tolist())) == 9
    assert all(len(EpochBatches(11, 2, 42, rank, 3)) == 2 for rank in range(3))
