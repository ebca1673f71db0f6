"""Weights in the Hugging Face Hub's form (salmm.model.hub, salmm export --hub-folder): round
trips give identical outputs, the safetensors file is what its specification says, every
``--checkpoint`` takes a folder or a Hub id, a hostile folder runs nothing, and Hub ids download
from a stand-in Hub on 127.0.0.1 (resumed after a cut; an unreachable Hub in one line)."""

from __future__ import annotations

import json
import logging
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.errors import BadInputError
from salmm import export as export_command
from salmm.evaluation.evaluator import evaluate
from salmm.evaluation.options import EvalOptions
from salmm.model import hub
from salmm.model.checkpoint import load_checkpoint
from salmm.model.net import SalMM
from tests._fake_hub import FakeHub, Served
from tests._inference_data import InferenceData, inference_data


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> InferenceData:
    return inference_data(tmp_path_factory)


@pytest.fixture(scope="module")
def folder(data, tmp_path_factory) -> Path:
    """`salmm export --hub-folder` of the session's training checkpoint."""
    out = tmp_path_factory.mktemp("hub") / "tiny"
    assert export_command.main(["--checkpoint", str(data.trainer), "--hub-folder",
                                str(out)]) == 0
    return out


def jittered(seed: int = 0) -> SalMM:
    torch.manual_seed(seed)
    model = SalMM(backend="builtin")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def outputs(model: SalMM) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(torch.rand(2, 3, 64, 64, generator=gen), torch.randn(2, 512, generator=gen))


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file, read per its specification: an 8-byte little-endian
    header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    body = raw[8 + length:]
    kinds = {"F32": np.float32, "F64": np.float64, "I64": np.int64}
    return {name: np.frombuffer(body[start:end], kinds[entry["dtype"]]).reshape(entry["shape"])
            for name, entry in header.items() if name != "__metadata__"
            for start, end in [entry["data_offsets"]]}


def test_save_then_from_pretrained_gives_identical_outputs(tmp_path):
    model = jittered()
    model.save_pretrained(str(tmp_path / "m"), dataset="bdda", dataset_version="0123abcd",
                          metrics={"CC": 0.5})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json",
                                                                   "model.safetensors"]
    stored = read_safetensors(tmp_path / "m" / "model.safetensors")
    state = model.state_dict()
    assert sorted(stored) == sorted(state)
    for name, value in stored.items():
        assert np.array_equal(value, state[name].numpy()), name
    loaded = SalMM.from_pretrained(str(tmp_path / "m"), backend="builtin")
    assert torch.equal(outputs(loaded), outputs(model))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["dataset_version"] == "0123abcd" and config["metrics"] == {"CC": 0.5}


def test_export_hub_folder_records_what_the_checkpoint_was_trained_on(data, folder):
    raw = load_checkpoint(data.trainer)
    config = json.loads((folder / "config.json").read_text())
    assert config["dataset_version"] == raw["dataset_version"] == data.version
    assert config["dataset"] == "trafficgaze"
    assert config["size"] == [64, 64] and config["clip"]["clip_pretrained"] is None
    assert config["source"]["kind"] == "salmm-train"
    assert config["training"] == raw["config"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: salmm\n") and data.version in card
    assert "RANDOM CLIP weights" in card and "random-clip" in card
    trained = SalMM(backend="builtin").eval()
    trained.load_state_dict(raw["state_dict"])
    assert torch.equal(outputs(SalMM.from_pretrained(str(folder), backend="builtin")),
                       outputs(trained))


def test_every_checkpoint_option_takes_a_hub_folder(data, folder, tmp_path):
    """salmm evaluate scores a Hub folder exactly as the checkpoint it came from."""
    means = []
    for checkpoint in (data.trainer, folder):
        summary = evaluate(EvalOptions(checkpoint=str(checkpoint), prepared=str(data.prepared),
                                       out=str(tmp_path / Path(checkpoint).name), split="test",
                                       cached_clip=True, workers=0))
        means.append(summary["means"])
    assert json.dumps(means[0], sort_keys=True) == json.dumps(means[1], sort_keys=True)


def test_the_evaluation_of_another_checkpoint_is_refused_in_one_line(data, tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"checkpoint": {"sha256": "0" * 64},
                                   "means_without_nan": {"CC": 0.1},
                                   "prepared": {"split": "test", "version_id": "x"}}))
    with pytest.raises(BadInputError, match="scores another checkpoint"):
        from salmm.deploy.hub_folder import write_hub_folder
        write_hub_folder(str(data.trainer), str(tmp_path / "out"), evaluation=str(summary))
    assert not (tmp_path / "out" / "config.json").exists()


def test_a_hostile_folder_runs_nothing_and_bad_files_are_one_line(folder, tmp_path):
    """Pickles and Python files beside the weights are never read; weights that are a pickle,
    or a config that is not ours, are refused naming the file."""
    import shutil

    hostile = Path(shutil.copytree(folder, tmp_path / "hostile"))
    marker = tmp_path / "ran"

    class Bomb:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (hostile / "pytorch_model.bin").write_bytes(pickle.dumps(Bomb()))
    (hostile / "modeling_salmm.py").write_text(f"open({str(marker)!r}, 'w')\n")
    SalMM.from_pretrained(str(hostile))
    assert not marker.exists()
    (hostile / "model.safetensors").write_bytes(pickle.dumps(Bomb()))
    with pytest.raises(BadInputError, match=r"model\.safetensors: not readable safetensors"):
        SalMM.from_pretrained(str(hostile))
    assert not marker.exists()
    shutil.copy(folder / "model.safetensors", hostile / "model.safetensors")
    (hostile / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(BadInputError, match=r"config\.json: not a salmm-hub config"):
        SalMM.from_pretrained(str(hostile))
    with pytest.raises(BadInputError, match="a folder without config.json"):
        SalMM.from_pretrained(str(tmp_path))


def test_a_hub_id_downloads_once_resumes_a_cut_and_pins_a_revision(folder, tmp_path,
                                                                   monkeypatch):
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    fake = FakeHub(repos={("models", "someone/salmm-tiny"): {"main": files, "v1": files}},
                   cut_once={"model.safetensors"})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    # the client keeps what it received in chunks of this size (10 MB by default, more than
    # these weights): smaller chunks let the cut leave some bytes to resume from
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    with Served(fake) as served:
        monkeypatch.setenv("HF_ENDPOINT", served.url)
        model = SalMM.from_pretrained("someone/salmm-tiny", backend="builtin")
        pinned = SalMM.from_pretrained("someone/salmm-tiny@v1", backend="builtin")
    assert torch.equal(outputs(model), outputs(SalMM.from_pretrained(str(folder),
                                                                     backend="builtin")))
    assert torch.equal(outputs(pinned), outputs(model))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")      # offline now: the cache serves
    assert torch.equal(outputs(SalMM.from_pretrained("someone/salmm-tiny@v1",
                                                     backend="builtin")), outputs(model))
    resumed = [r for r in fake.requests if r[0] == "GET" and r[1].endswith("model.safetensors")
               and r[2]]
    assert len(resumed) == 1, fake.requests
    start = int(resumed[0][2].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= len(files["model.safetensors"]) // 2
    with pytest.raises(BadInputError, match="someone/other: no such model on the Hub"), \
            Served(fake) as served:
        monkeypatch.setenv("HF_ENDPOINT", served.url)
        hub.resolve("someone/other")


def test_an_unreachable_hub_is_one_line_within_seconds(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")      # nothing listens there
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    start = time.monotonic()
    with pytest.raises(BadInputError) as refused:
        hub.resolve("someone/salmm-tiny")
    assert time.monotonic() - start < 10
    assert str(refused.value).startswith("someone/salmm-tiny: the Hub cannot be reached")


def test_push_uploads_exactly_the_folder(folder, monkeypatch, caplog):
    """--push-to-hub creates the repository and uploads the three files (the Hub's client
    stands in: no network here)."""
    calls = []

    class Api:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private))

        def upload_folder(self, repo_id, folder_path, allow_patterns, commit_message):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir()
                                                   if p.name in allow_patterns)))
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    with caplog.at_level(logging.INFO):
        assert export_command.main(["--checkpoint", str(folder), "--push-to-hub",
                                    "someone/salmm-tiny", "--private"]) == 0
    assert calls == [("create", "someone/salmm-tiny", True),
                     ("upload", "someone/salmm-tiny",
                      ["README.md", "config.json", "model.safetensors"])]
    assert any("https://hub/someone/salmm-tiny/commit/1" in r.getMessage()
               for r in caplog.records)
