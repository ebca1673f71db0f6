"""ONNX export: the graphs compute the network and CLIP, a frozen scan is refused, export.json
describes what was written and deployments refuse an export of something else."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from pipeline.core.errors import BadInputError
from pipeline.encoders.clip import build_clip_encoder
from salmm.deploy import graphs as export_module
from salmm.deploy.graphs import (
    GRAPH_TOLERANCE,
    ClipGraph,
    checked_export,
    export,
    export_network,
)
from salmm.deploy.options import ExportOptions
from salmm.export import main
from salmm.model.loading import load_model
from salmm.model.net import SalMM
from tests._inference_data import (
    FRAMES,
    InferenceData,
    inference_data,
    onnx_export,
    stand_in_graphs,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> InferenceData:
    return inference_data(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(data: InferenceData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return onnx_export(tmp_path_factory)


def _network(seed: int, eps: float | None = None) -> dict[str, torch.Tensor]:
    """A random SalMM's weights with CLIP mattering (gamma 1e-2); LayerNorm eps changed when
    given (the state dict does not carry it: the test patches SalMM for those)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SalMM(backend="builtin")
    torch.nn.init.constant_(model.CrossModelAtt.gamma, 1e-2)
    return model.state_dict()


class _WellConditioned(SalMM):
    """SalMM with every LayerNorm's eps at 0.1: the published 1e-5 on two- and four-channel
    LayerNorms turns float32 rounding into differences of 1e-4 to 3e-3 (README, "Real time")."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for module in self.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = 0.1


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_exported_network_computes_the_network(size, tmp_path: Path, monkeypatch):
    """At 128x128 and 96x160 (square and not; no part of the graph is specific to a size, so
    these stand for 256x256 at a quarter of the time), batch 1 and 4: the float64 graph equals PyTorch to 1e-6 (this
    is what tells a right graph from a wrong one), and where the network is well conditioned
    the float32 graph under onnxruntime is within 1e-4 of PyTorch float32 too."""
    monkeypatch.setattr(export_module, "SalMM", _WellConditioned)
    checks = export_network(_network(seed=0), size, tmp_path / "salmm.onnx")
    assert checks["graph"] <= GRAPH_TOLERANCE
    assert checks["onnxruntime"] <= 1e-4
    assert checks["pytorch_float32"] <= 1e-4


def test_a_scan_traced_into_constants_is_refused(data: InferenceData, tmp_path: Path):
    """The CPU scan's numba kernels trace into constants: that export is refused in one line
    and nothing is written."""
    out = tmp_path / "onnx"
    with pytest.raises(BadInputError, match="computes something else"):
        export(ExportOptions(checkpoint=str(data.trainer), out=str(out), backend="builtin",
                             size=(32, 32)))         # the smallest frames: the refusal is the same
    assert not out.exists()


def test_clip_graph_resizes_as_torchvision():
    """ClipGraph's resize-as-matrices equals torchvision's antialiased resize (bilinear and
    bicubic, down and up)."""
    frames = torch.rand(2, 3, 96, 160, generator=torch.Generator().manual_seed(3))
    for interpolation in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC):
        for target in ((224, 224), (48, 200)):
            encoder = type("Encoder", (), {"visual": torch.nn.Identity(), "size": target,
                                           "interpolation": interpolation, "mean": None,
                                           "std": None})()
            got = ClipGraph(encoder, (96, 160))(frames)
            want = TF.resize(frames, list(target), interpolation, antialias=True)
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=2e-6)


def test_export_writes_both_graphs_and_describes_them(data: InferenceData, exported: Path):
    """(The session's export also asked for the int8 CLIP: clip-int8.onnx, tested below.)"""
    description = json.loads((exported / "export.json").read_text())
    assert sorted(p.name for p in exported.iterdir()) == ["clip-int8.onnx", "clip.onnx",
                                                          "export.json", "salmm.onnx"]
    assert sorted(description["graphs"]) == ["clip", "clip-int8", "salmm"]
    assert description["format"] == "salmm-onnx"
    assert description["size"] == {"height": 64, "width": 64}
    loaded = load_model(str(data.trainer), inline_clip=False, given_clip={}, device="cpu")
    assert description["checkpoint"]["sha256"] == loaded.info["sha256"]
    assert description["clip"]["weights"] == "random-seed0"
    # the published LayerNorms: the graph is exact in float64; float32 under onnxruntime
    # differs on the scale of float32 rounding in PyTorch itself
    checks = description["graphs"]["salmm"]["checks"]
    assert checks["float64_graph_max_abs_difference"] <= GRAPH_TOLERANCE
    assert checks["onnxruntime_float32_max_abs_difference"] <= (
        10 * checks["pytorch_float32_rounding_max_abs"] + 1e-4)
    assert description["graphs"]["clip"]["checks"][
        "onnxruntime_float32_relative_difference"] <= 1e-3

    frames = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    encoder = build_clip_encoder("ViT-B-32", None, "salmm", "cpu")
    clip = onnxruntime.InferenceSession(str(exported / "clip.onnx"))
    network = onnxruntime.InferenceSession(str(exported / "salmm.onnx"))
    embedding = clip.run(None, {"frame": frames.numpy()})[0]
    with torch.inference_mode():
        want_embedding = encoder.encode(frames)
        want = loaded.model(frames, want_embedding).numpy()
    assert embedding.shape == (3, 512)
    assert np.abs(embedding - want_embedding.numpy()).max() <= 1e-3 * np.abs(embedding).max()
    got = network.run(None, {"frame": frames.numpy(), "embedding": embedding})[0]
    assert got.shape == (3, 1, 64, 64)
    assert np.abs(got - want).max() <= 1e-3


def test_deployment_refuses_an_export_of_something_else(data: InferenceData, exported: Path,
                                                        tmp_path: Path):
    loaded = load_model(str(data.trainer), inline_clip=False, given_clip={}, device="cpu")
    assert checked_export(exported, loaded, (64, 64))["format_version"] == 2
    with pytest.raises(BadInputError, match="graphs for 64x64 frames, not 96x64"):
        checked_export(exported, loaded, (64, 96))
    official = load_model(str(data.official), inline_clip=False, given_clip={}, device="cpu")
    with pytest.raises(BadInputError, match="exported from another checkpoint"):
        checked_export(exported, official, (64, 64))

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    (copy / "clip.onnx").unlink()
    with pytest.raises(BadInputError, match="clip.onnx: missing from the export"):
        checked_export(copy, loaded, (64, 64))
    for text, message in (("{", "unreadable"), ('{"format": "other"}', "not a salmm-onnx"),
                          ('{"format": "salmm-onnx", "format_version": 9}', "format version 9")):
        (copy / "export.json").write_text(text)
        with pytest.raises(BadInputError, match=message):
            checked_export(copy, loaded, (64, 64))
    with pytest.raises(BadInputError, match="no such file: not an export"):
        checked_export(tmp_path, loaded, (64, 64))


def test_export_command_one_line_errors(data: InferenceData, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture):
    out = tmp_path / "o"
    with caplog.at_level(logging.ERROR):
        assert main(["--checkpoint", str(data.trainer), "--out", str(out), "--size",
                     "64x48"]) == 2
        assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2
    assert errors[0].startswith(str(data.trainer)) and "multiples of 32" in errors[0]
    assert errors[1].startswith(str(tmp_path / "missing.pt"))
    assert not out.exists()


def _with_graph(folder: Path, name: str, data: bytes, *, rehash: bool) -> None:
    """Put ``data`` as ``<name>.onnx``; with ``rehash`` also make export.json record its sha256
    (what someone who edits both files can do)."""
    import hashlib

    (folder / f"{name}.onnx").write_bytes(data)
    if rehash:
        record = json.loads((folder / "export.json").read_text())
        record["graphs"][name]["sha256"] = hashlib.sha256(data).hexdigest()
        (folder / "export.json").write_text(json.dumps(record))


def test_crafted_graphs_are_refused_in_one_line_before_onnxruntime_opens_them(
        data: InferenceData, exported: Path, tmp_path: Path):
    import onnx
    from onnx import TensorProto, helper

    from salmm.deploy.live import OnnxRunner
    loaded = load_model(str(data.trainer), inline_clip=False, given_clip={}, device="cpu")
    record = checked_export(exported, loaded, (64, 64))
    assert all(len(record["graphs"][g]["sha256"]) == 64 for g in ("salmm", "clip"))
    copy = tmp_path / "copy"

    def fresh() -> Path:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(exported, copy)
        return copy

    swapped = (exported / "clip.onnx").read_bytes()                # a valid graph, another one
    _with_graph(fresh(), "salmm", swapped, rehash=False)
    with pytest.raises(BadInputError, match=r"salmm\.onnx: differs from the sha256"):
        checked_export(copy, loaded, (64, 64))
    _with_graph(fresh(), "salmm", np.random.default_rng(0).bytes(4096), rehash=True)
    with pytest.raises(BadInputError, match=r"salmm\.onnx: not an ONNX graph"):
        checked_export(copy, loaded, (64, 64))
    # a weight stored "outside", at a system file
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "/etc/hostname"), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              initializer=[weight])
    _with_graph(fresh(), "salmm", helper.make_model(graph).SerializeToString(), rehash=True)
    with pytest.raises(BadInputError, match=r"salmm\.onnx: refers to external weight files"):
        checked_export(copy, loaded, (64, 64))
    # a well-formed protobuf that onnxruntime refuses: one line from the runner too
    broken = helper.make_model(helper.make_graph(
        [helper.make_node("NoSuchOperator", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    _with_graph(fresh(), "salmm", broken.SerializeToString(), rehash=True)
    checked_export(copy, loaded, (64, 64))
    with pytest.raises(BadInputError, match=r"salmm\.onnx: onnxruntime cannot load it") as err:
        OnnxRunner(copy, 1)
    assert "\n" not in str(err.value)
    assert onnx.load(str(exported / "salmm.onnx")) is not None


def test_int8_clip_is_measured_on_the_users_frames_and_recorded(data: InferenceData,
                                                                exported: Path, tmp_path: Path):
    """The export's int8 CLIP: its cosine to float32 recorded (worst, mean, frames, source)
    and recomputed here from the two graphs, written out; sha256 checked like the others."""
    from salmm.data.sources import image_items, network_input
    from salmm.deploy.options import INT8_COSINE

    record = json.loads((exported / "export.json").read_text())
    checks = record["graphs"]["clip-int8"]["checks"]
    assert checks["frames"] == FRAMES and checks["source"].endswith("01")
    assert INT8_COSINE <= checks["cosine_min"] <= checks["cosine_mean"] <= 1.0
    runs = [onnxruntime.InferenceSession(str(exported / name), providers=["CPUExecutionProvider"])
            for name in ("clip.onnx", "clip-int8.onnx")]
    worst = 1.0
    files = sorted((data.raw / "trafficframe" / "01").glob("*.jpg"))
    for item in image_items(files, (64, 64)):
        frame = network_input(item.model_input)
        a, b = (r.run(None, {"frame": frame})[0][0].astype(np.float64) for r in runs)
        worst = min(worst, a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert abs(worst - checks["cosine_min"]) < 1e-3
    assert (exported / "clip-int8.onnx").stat().st_size < (exported / "clip.onnx").stat().st_size / 3
    loaded = load_model(str(data.trainer), inline_clip=False, given_clip={}, device="cpu")
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    (copy / "clip-int8.onnx").write_bytes(b"changed")
    with pytest.raises(BadInputError, match=r"clip-int8\.onnx: differs from the sha256"):
        checked_export(copy, loaded, (64, 64))


def test_int8_clip_below_the_cosine_floor_is_refused_and_nothing_written(
        data: InferenceData, tmp_path: Path, monkeypatch):
    """A cosine floor the int8 graph cannot meet: one line naming the frames, no export."""
    stand_in_graphs(monkeypatch)  # the network and CLIP graphs are not the point here
    monkeypatch.setattr(export_module, "INT8_COSINE", 1.5)
    frames = data.raw / "trafficframe" / "01"
    with pytest.raises(BadInputError, match=r"01: int8 CLIP.s embedding has cosine (0\.9\d+|1\.0+) to"
                       r" float32 on the worst of \d+ frames \(below 1\.5\); not exported"):
        export(ExportOptions(checkpoint=str(data.trainer), out=str(tmp_path / "out"),
                             clip_int8=str(frames)))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(BadInputError, match=r"nowhere: no such video or folder"):
        export(ExportOptions(checkpoint=str(data.trainer), out=str(tmp_path / "out"),
                             clip_int8=str(tmp_path / "nowhere")))
