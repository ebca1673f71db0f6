"""The ``embed`` command end to end on a tiny prepared dataset, with random ViT-B-32 weights:
values against a one-frame-at-a-time reference, flips, the same bytes whatever the thread
count, batch size, worker count or resume point, Dask, refusals."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr
from _prepared import write_prepared
from conftest import write_tiny_dataset

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.core.pipes import prefetch
from pipeline.encoders.clip import ClipSpec, build_clip_encoder, cached_encoder
from pipeline.encoders.embedding import ChunkJob, _decoded_batches, _read_samples, embed_prepared
from pipeline.formats.clip_cache import default_cache_path, open_cache
from pipeline.formats.manifest import read_manifest, shard_urls, write_manifest
from pipeline.formats.shards import read_shard, split_shards, write_shard
from pipeline.normalize import normalize

SPEC = ClipSpec(pretrained=None)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(dask_cluster):
    """An in-process Dask cluster for normalize and the Dask embed test."""
    return dask_cluster


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, cluster) -> Path:
    """A real prepared BDDA dataset (256x256 frames): train shards of 2 + 1 samples, valid 1,
    test 0 (its split file is empty)."""
    tmp = tmp_path_factory.mktemp("embed")
    raw = write_tiny_dataset(tmp / "raw", "bdda", frames={1: 2, 2: 1, 3: 1},
                             splits={"train": [1, 2], "valid": [3]})
    normalize("bdda", raw, str(tmp / "prepared"), shard_size=2,
              dask_address=cluster.scheduler_address, progress=False)
    return tmp / "prepared"


@pytest.fixture(scope="module")
def cache_path(prepared) -> str:
    """The uninterrupted reference run: chunks of 2 samples, batches of 2 samples."""
    return embed_prepared(prepared, prepared.parent / "full.zarr", spec=SPEC, batch_size=2,
                          chunk_size=2, workers=1)


def reference_embeddings(prepared: Path, split: str) -> tuple[list[str], np.ndarray]:
    """Read with webdataset's own decoder, embed one image at a time: keys, [N, 2, D]."""
    encoder = cached_encoder(SPEC)
    urls = shard_urls(str(prepared), read_manifest(str(prepared)), split)
    keys, out = [], []
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("rgb"):
        frame = torch.from_numpy(sample["png"]).permute(2, 0, 1)[None]   # [1, 3, H, W] in [0, 1]
        with torch.inference_mode():
            pair = [encoder.encode(frame), encoder.encode(frame.flip(-1))]
        keys.append(sample["__key__"])
        out.append(torch.cat(pair).numpy())
    return keys, np.stack(out)


def test_cache_matches_per_frame_reference(prepared, cache_path):
    cache = open_cache(cache_path, prepared=prepared)
    for split in ("train", "valid"):
        keys, emb = cache.load_split(split)
        want_keys, want = reference_embeddings(prepared, split)
        assert keys == want_keys
        assert emb.shape == (len(keys), 2, 512) and emb.dtype == np.float32
        np.testing.assert_allclose(emb, want, rtol=1e-4, atol=2e-5)
        # the flipped frame's embedding is its own, not a copy of the original's
        assert np.abs(emb[:, 0] - emb[:, 1]).max() > 1e-3
    np.testing.assert_array_equal(cache.get(keys[0]), emb[0])
    keys, emb = cache.load_split("test")                       # empty split file
    assert keys == [] and emb.shape == (0, 2, 512)


def openai_vision_reference(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's image tower written out in float64 from its weights (open_clip's key
    names, which are OpenAI's under ``visual.``): patches, class token, positions, pre-norm,
    residual blocks of multi-head attention (64-wide heads) and a QuickGELU MLP,
    ``x * sigmoid(1.702 x)``, post-norm of the class token, projection. [B, 3, 224, 224] ->
    [B, D]."""
    p = {k: v.double() for k, v in weights.items()}
    width, _, patch, _ = p["conv1.weight"].shape
    x = torch.nn.functional.conv2d(x.double(), p["conv1.weight"], stride=patch)
    x = x.flatten(2).transpose(1, 2)                                    # [B, grid^2, width]
    x = torch.cat([p["class_embedding"].expand(len(x), 1, width), x], 1) + p["positional_embedding"]

    def norm(t, name):
        return torch.nn.functional.layer_norm(t, (width,), p[f"{name}.weight"],
                                              p[f"{name}.bias"], 1e-5)

    x = norm(x, "ln_pre")
    heads = width // 64
    blocks = sorted({int(k.split(".")[2]) for k in p if k.startswith("transformer.resblocks.")})
    for i in blocks:
        b = f"transformer.resblocks.{i}."
        q, k, v = (norm(x, b + "ln_1") @ p[b + "attn.in_proj_weight"].T
                   + p[b + "attn.in_proj_bias"]).split(width, -1)
        q, k, v = (t.reshape(*t.shape[:2], heads, 64).transpose(1, 2) for t in (q, k, v))
        attended = torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1) @ v
        attended = attended.transpose(1, 2).reshape(x.shape)
        x = x + attended @ p[b + "attn.out_proj.weight"].T + p[b + "attn.out_proj.bias"]
        h = norm(x, b + "ln_2") @ p[b + "mlp.c_fc.weight"].T + p[b + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)                                 # QuickGELU
        x = x + h @ p[b + "mlp.c_proj.weight"].T + p[b + "mlp.c_proj.bias"]
    return norm(x[:, 0], "ln_post") @ p["proj"]


def test_encoder_is_openais_vision_transformer_with_quickgelu():
    from torchvision.transforms import Resize

    encoder = cached_encoder(SPEC)
    frames = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ours = encoder.encode(frames).double()
    want = openai_vision_reference(encoder.visual.state_dict(), Resize([224, 224])(frames))
    scale = want.abs().max()
    assert (ours - want).abs().max() <= 1e-5 * scale
    # the same weights through GELU land far outside that tolerance
    gelu = copy.deepcopy(encoder.visual)
    for block in gelu.transformer.resblocks:
        block.mlp.gelu = torch.nn.GELU()
    with torch.inference_mode():
        other = gelu(Resize([224, 224])(frames)).double()
    assert (other - want).abs().max() > 100 * 1e-5 * scale


def test_header_records_what_the_numbers_depend_on(prepared, cache_path):
    identity = open_cache(cache_path).identity
    manifest = read_manifest(str(prepared))
    assert identity["encoder"]["weights"].startswith("random")
    assert identity["encoder"]["model"] == "ViT-B-32"
    assert identity["encoder"]["profile"] == "salmm"
    assert identity["encoder"]["activation"] == "quickgelu"      # OpenAI's CLIP, as published
    assert identity["prepared"]["version_id"] == manifest["version_id"]
    assert identity["splits"] == {"train": 3, "valid": 1, "test": 0}
    assert identity["dtype"] == "float32"
    assert identity["compute"] == {"device": "cpu", "autocast": "fp32", "micro_batch": 8,
                                   "intra_op_threads": 1}
    assert identity["software"]["torch"] == torch.__version__
    assert default_cache_path(str(prepared), identity["encoder"]).endswith(
        "/clip/ViT-B-32-salmm-random-seed0.zarr")


def test_batches_never_straddle_chunks_and_prefetch_keeps_order(prepared, cache_path):
    keys = open_cache(cache_path).keys("train")
    manifest = read_manifest(str(prepared))
    shards = split_shards(str(prepared), manifest, "train")
    assert [(s.first, s.samples) for s in shards] == [(0, 2), (2, 1)]
    jobs = [ChunkJob("train", 0, 0, 1), ChunkJob("train", 2, 2, 3)]   # chunk 1 already done
    batches = list(prefetch(_decoded_batches(shards, jobs, batch_size=3), depth=1))
    assert [(b.job.index, b.keys, b.last) for b in batches] == [
        (0, keys[0:1], True), (2, keys[2:3], True)]
    assert batches[0].frames.shape == (1, 256, 256, 3) and batches[0].frames.dtype == torch.uint8


@pytest.mark.parametrize("chunk", [2, 3, 4])
def test_reader_yields_exactly_the_samples_of_the_missing_chunks(tmp_path, chunk):
    prepared = write_prepared(tmp_path / "p", {"train": [3, 1, 4, 2]})
    urls = shard_urls(str(prepared), read_manifest(str(prepared)), "train")
    shards = split_shards(str(prepared), read_manifest(str(prepared)), "train")
    assert [(s.first, s.samples) for s in shards] == [(0, 3), (3, 1), (4, 4), (8, 2)]
    all_keys = [sample["__key__"] for shard in shards for sample in read_shard(shard)]
    chunks = [ChunkJob("train", i, i * chunk, min(i * chunk + chunk, 10))
              for i in range(-(-10 // chunk))]
    for mask in range(1 << len(chunks)):
        jobs = [job for job in chunks if mask >> job.index & 1]
        want = [i for job in jobs for i in range(job.start, job.stop)]
        got = list(_read_samples(shards, jobs))
        assert [g[0] for g in got] == want
        assert [g[2] for g in got] == [all_keys[i] for i in want]
        assert all(g[1] == urls[next(k for k, s in enumerate(shards)
                                     if s.first <= g[0] < s.first + s.samples)] for g in got)


def test_prefetch_reraises_errors_from_the_reader():
    def items():
        yield 1
        raise BadInputError("shard.tar", "broken")

    got = prefetch(items(), depth=2)
    assert next(got) == 1
    with pytest.raises(BadInputError, match="broken"):
        next(got)


def _embed_command(prepared: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "embed", "--prepared", str(prepared),
            "--out", str(out), "--clip-pretrained", "none", "--batch-size", "2",
            "--chunk-size", "2", *extra]


KILL_AFTER_FIRST_CHUNK = """
import os, signal, sys
from pipeline.formats import clip_cache
from pipeline.cli import main
write = clip_cache.CacheWriter.write_chunk
def write_then_die(self, *args, **kwargs):
    write(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
clip_cache.CacheWriter.write_chunk = write_then_die
sys.exit(main(sys.argv[1:]))
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(REPO), os.environ.get("PYTHONPATH")])), **extra}


def _tree(path: Path) -> dict[str, object]:
    """Every array (values) and group/array attributes of a store, by name."""
    root = zarr.open_group(str(path), mode="r")
    out: dict[str, object] = {"/attrs": dict(root.attrs)}
    for name, node in root.members(max_depth=None):
        out[f"{name}/attrs"] = dict(node.attrs)
        if isinstance(node, zarr.Array):
            out[name] = node[:]
    return out


def assert_same_store(got: Path, want: Path) -> None:
    """Two stores hold the same arrays bit for bit and the same attributes."""
    got_tree, want_tree = _tree(got), _tree(want)
    assert got_tree.keys() == want_tree.keys()
    for name, value in want_tree.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got_tree[name], value, err_msg=name)
        else:
            assert got_tree[name] == value, name


def test_killed_run_resumes_to_the_identical_store(prepared, cache_path, tmp_path):
    out = tmp_path / "killed.zarr"
    command = _embed_command(prepared, out, "--workers", "1")
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_CHUNK, *command[3:]],
                            cwd=REPO, env=_env(), capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = zarr.open_group(str(out), mode="r")["train/done"][:]
    assert done.tolist() == [1, 0]                     # killed after its first chunk
    with pytest.raises(BadInputError, match="incomplete"):
        open_cache(out)

    subprocess.run(command, cwd=REPO, env=_env(), check=True, capture_output=True)
    assert_same_store(out, Path(cache_path))
    assert not list(out.rglob("*.partial"))


@pytest.mark.parametrize("threads", ["1", "2"])
def test_the_thread_count_changes_no_number(prepared, cache_path, tmp_path, threads):
    out = tmp_path / f"threads{threads}.zarr"
    subprocess.run(_embed_command(prepared, out, "--workers", "1"), cwd=REPO,
                   env=_env(OMP_NUM_THREADS=threads), check=True, capture_output=True)
    assert_same_store(out, Path(cache_path))


@pytest.mark.parametrize("batch_size", [4, 8])
def test_the_batch_size_changes_no_number(prepared, tmp_path, batch_size):
    reference = embed_prepared(prepared, tmp_path / "b1.zarr", spec=SPEC, batch_size=1,
                               chunk_size=4, workers=1)
    out = embed_prepared(prepared, tmp_path / f"b{batch_size}.zarr", spec=SPEC,
                         batch_size=batch_size, chunk_size=4, workers=1)
    assert_same_store(Path(out), Path(reference))


def test_resume_with_another_profile_is_refused(prepared, tmp_path):
    out = tmp_path / "c.zarr"
    embed_prepared(prepared, out, spec=SPEC, batch_size=2, chunk_size=2, splits=["valid"],
                   workers=1)
    with pytest.raises(BadInputError, match="cannot resume.*profile"):
        embed_prepared(prepared, out, spec=ClipSpec(pretrained=None, profile="openclip"),
                       batch_size=2, chunk_size=2, splits=["valid"], workers=1)


def test_dask_workers_write_the_same_cache(prepared, cache_path, cluster, tmp_path):
    out = embed_prepared(prepared, tmp_path / "dask.zarr", spec=SPEC, batch_size=2,
                         chunk_size=2, dask_address=cluster.scheduler_address)
    assert_same_store(Path(out), Path(cache_path))


def test_two_local_encoder_processes_write_the_same_cache(prepared, cache_path, tmp_path):
    out = embed_prepared(prepared, tmp_path / "two.zarr", spec=SPEC, batch_size=2,
                         chunk_size=2, workers=2)
    assert_same_store(Path(out), Path(cache_path))


def test_shard_with_fewer_samples_than_the_manifest_is_refused(tmp_path):
    prepared = write_prepared(tmp_path / "p", {"train": [2]})
    manifest = read_manifest(str(prepared))
    manifest["splits"]["train"]["shards"][0]["samples"] = 3
    manifest["splits"]["train"]["samples"] = 3
    write_manifest(Folder(prepared), {k: v for k, v in manifest.items() if k != "version_id"})
    with pytest.raises(BadInputError, match="train-000000.tar: has 2 samples, the manifest says 3"):
        embed_prepared(prepared, spec=SPEC, batch_size=2, chunk_size=2, workers=1)


@pytest.mark.parametrize("damage, message", [
    ([{"__key__": "v0001_f000001", "jpg": b"not a jpeg"}, {"__key__": "v0002_f000001",
                                                            "jpg": b"nor this"}],
     r"train-000000.tar#v0001_f000001: corrupt image"),
    ([{"__key__": "v0001_f000001", "json": b"{}"}, {"__key__": "v0002_f000001", "json": b"{}"}],
     r"train-000000.tar: sample v0001_f000001 has no frame"),
    (None, r"train-000000.tar: shard listed in the manifest is missing"),
])
def test_damaged_shards_are_reported_in_one_line(tmp_path, damage, message):
    prepared = write_prepared(tmp_path / "p", {"train": [2]})
    folder = Folder(prepared)
    if damage is None:
        folder.remove("train-000000.tar")
    else:
        write_shard(folder, "train-000000.tar", damage)
    with pytest.raises(BadInputError, match=message) as err:
        embed_prepared(prepared, tmp_path / "c.zarr", spec=SPEC, batch_size=2, chunk_size=2,
                       workers=1)
    assert "\n" not in str(err.value)
    with pytest.raises(BadInputError, match="incomplete"):
        open_cache(tmp_path / "c.zarr")


def test_unavailable_weights_fail_with_one_line_saying_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': no network\nmore")

    monkeypatch.setattr("pipeline.encoders.clip._cached_weights", lambda cfg: False)
    monkeypatch.setattr("pipeline.core.network.reachable", lambda host, port: None)
    monkeypatch.setattr("open_clip.create_model_and_transforms", offline)
    with pytest.raises(BadInputError) as err:
        build_clip_encoder(pretrained="openai")
    message = str(err.value)
    assert "\n" not in message and "no network" in message
    assert "--clip-pretrained none" in message and "local" in message


def test_an_unreachable_weights_host_is_known_at_once_without_retries(monkeypatch):
    monkeypatch.setattr("pipeline.encoders.clip._cached_weights", lambda cfg: False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")     # nothing listens there
    monkeypatch.setattr("open_clip.create_model_and_transforms",
                        lambda *a, **k: pytest.fail("no download may be attempted"))
    with pytest.raises(BadInputError, match=r"127\.0\.0\.1:9 cannot be reached") as err:
        build_clip_encoder(pretrained="openai")
    assert "\n" not in str(err.value) and "--clip-pretrained none" in str(err.value)
