"""Differential tests against the authors' own code (``zhao-chunyu/SaliencyMamba``): their
``Dataset`` classes, their vendored OpenAI CLIP, their loss and optimiser, on the same synthetic
raw data and weights. Their files are imported where they lie (:mod:`tests._reference`); the
tests skip, saying why, where they are not at hand.

What is compared, and how close it must be:

* frames: the tensor their loader returns and the one salmm's trainer feeds (``uint8 / 255``
  from the prepared shard), **exactly**; labels within 1e-6;
* CLIP: their ``build_model`` + ``encode_image`` after their ``Resize([224, 224])`` and the
  cache ``python -m pipeline embed`` writes, frame and flip, within float32 rounding on the
  same weight file (open_clip's GELU build is two orders of magnitude further away);
* training: ``nn.BCELoss`` and one ``torch.optim.Adam(lr, weight_decay)`` step, as their
  ``train.py`` takes it, against salmm's training step on the same batch, within 1e-6 - also
  on a batch whose predictions saturate to exactly 0 and 1.
"""

from __future__ import annotations

import copy
import json
import shutil
import types
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from pipeline.datasets.matfile import load_fixdata, write_fixdata
from pipeline.encoders.clip import ClipSpec
from pipeline.encoders.embedding import embed_prepared
from pipeline.formats.clip_cache import open_cache
from pipeline.formats.manifest import prepared_size, read_manifest
from pipeline.formats.shards import read_shard, split_shards
from pipeline.normalize import normalize
from salmm.data.stages import decode_sample
from salmm.model.net import SalMM
from salmm.training import loop as train_loop
from salmm.training import runtime as train_runtime
from salmm.training.config import TrainConfig
from tests._reference import needs_reference, reference_module
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)

pytestmark = [needs_reference, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
SIZE = (256, 256)
EDGE_POINTS = np.array([[0, 0, 1280.0, 720.0], [0, 0, 1.0, 1.0], [0, 0, 640.5, 0.4],
                        [0, 0, -0.7, 300.0], [0, 0, 1281.0, 5.0]])
"""Fixations on the frame's edges and just past them (x in column 3, y in column 4)."""


def _prepared_samples(prepared: Path, split: str) -> dict[str, dict]:
    manifest = read_manifest(str(prepared))
    out = {}
    for shard in split_shards(str(prepared), manifest, split):
        for raw in read_shard(shard):
            out[raw["__key__"]] = decode_sample(raw, prepared_size(manifest))
    return out


def _their_args(root: Path) -> types.SimpleNamespace:
    return types.SimpleNamespace(root=str(root), img_shape=SIZE)


def _key(name: str) -> str:
    video, frame = name.removesuffix(".jpg").split("/")
    return f"v{int(video):04d}_f{int(frame):06d}"


@pytest.fixture(scope="module")
def trafficgaze(synth_dataset, tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic TrafficGaze download (two edge-point cells added) and its prepared folder."""
    root = tmp_path_factory.mktemp("authors") / "tg"
    shutil.copytree(synth_dataset("trafficgaze", videos=3, frames=9), root)
    fixdata = root / "fixdata" / "fixdata1.mat"
    cells = load_fixdata(fixdata)
    cells[6] = np.concatenate([cells[6].reshape(-1, 4), EDGE_POINTS])  # frame 7 of video 1
    write_fixdata(fixdata, cells)
    prepared = root.parent / "prepared"
    normalize("trafficgaze", root, str(prepared), shard_size=4, workers=1, progress=False)
    return root, prepared


@pytest.fixture(scope="module")
def bdda(synth_dataset, tmp_path_factory) -> tuple[Path, Path]:
    root = synth_dataset("bdda", videos=3, frames=6)
    prepared = tmp_path_factory.mktemp("authors") / "bdda"
    normalize("bdda", root, str(prepared), shard_size=4, workers=1, progress=False)
    return root, prepared


# ---- the loaders -------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["trafficgaze", "bdda"])
def test_their_dataset_and_our_loader_give_the_same_frames_and_labels(dataset, request):
    root, prepared = request.getfixturevalue(dataset)
    if dataset == "bdda":
        their_class = reference_module("utils/datasets/BDDA.py").ImageList_BDDA
    else:
        their_class = reference_module("utils/datasets/TrafficGaze.py").ImageList_TrafficGaze
    checked = 0
    for split in ("train", "valid", "test"):
        names = [json.loads(line) for line in (root / f"{split}.json").read_text().splitlines()]
        ours = _prepared_samples(prepared, split)
        theirs = their_class(_their_args(root), names, for_train=False)
        for i, name in enumerate(names):
            frame, label = theirs[i]
            sample = ours[_key(name)]
            fed = sample["frame"].float() / 255                # what the trainer feeds SalM2
            assert fed.dtype == frame.dtype == torch.float32
            assert torch.equal(fed, frame), name
            assert label.shape == sample["label"].shape
            assert (label - sample["label"]).abs().max() <= 1e-6, name
            checked += 1
    assert checked >= 9


def test_edge_fixations_follow_their_loader_in_training(trafficgaze):
    root, prepared = trafficgaze
    loader = reference_module("utils/datasets/TrafficGaze.py")
    theirs = torch.from_numpy(loader.getLabel(str(root), 1, 7, SIZE))
    ours = _prepared_samples(prepared, "train")["v0001_f000007"]["label"][0]
    assert (theirs - ours).abs().max() <= 1e-6


# ---- CLIP --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    """A random ViT-B/32 weight file in OpenAI's state-dict layout, float32 (the authors' loader
    rounds it to float16 on load; OpenAI's own file is already float16)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None,
                                                            force_quick_gelu=True)
    path = tmp_path_factory.mktemp("clip") / "ViT-B-32-random.pt"
    torch.save(model.state_dict(), path)
    return path


def _their_clip(path: Path) -> torch.nn.Module:
    """``clip.load(path, device="cpu")`` of their vendored copy, without its downloader."""
    model_py = reference_module("utils/models/clip/model.py")
    state = torch.load(path, map_location="cpu")
    return model_py.build_model(state).float().eval()


def test_their_clip_and_our_cache_agree_to_float32_rounding(bdda, clip_file, tmp_path):
    from torchvision.transforms import Resize

    _, prepared = bdda
    cache = embed_prepared(prepared, tmp_path / "cache.zarr", spec=ClipSpec(
        pretrained=str(clip_file)), splits=["valid"], workers=1)
    keys, embeddings = open_cache(cache).load_split("valid")
    samples = _prepared_samples(prepared, "valid")
    frames = torch.stack([samples[k]["frame"] for k in keys]).float() / 255
    theirs_model = _their_clip(clip_file)
    with torch.no_grad():
        theirs = theirs_model.encode_image(Resize([224, 224])(frames))
        theirs_flip = theirs_model.encode_image(Resize([224, 224])(frames.flip(-1)))
        gelu, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=str(clip_file))
        other = gelu.visual(Resize([224, 224])(frames))
    scale = float(theirs.abs().max())
    tolerance = 1e-5 * scale
    assert (torch.from_numpy(embeddings[:, 0]) - theirs).abs().max() <= tolerance
    assert (torch.from_numpy(embeddings[:, 1]) - theirs_flip).abs().max() <= tolerance
    assert (other - theirs).abs().max() > 100 * tolerance        # the test can tell GELU apart


# ---- the training step -------------------------------------------------------------------------


def _batch(prepared: Path) -> dict:
    """Four training samples and made-up CLIP embeddings [4, 512]."""
    samples = list(_prepared_samples(prepared, "train").values())[:4]
    rng = np.random.default_rng(0)
    return {"frame": torch.stack([s["frame"] for s in samples]),
            "label": torch.stack([s["label"] for s in samples]),
            "emb": torch.from_numpy(rng.normal(0, 1, (len(samples), 512)).astype(np.float32))}


@pytest.mark.parametrize("saturate", [False, True], ids=["plain", "saturated"])
def test_one_training_step_equals_bce_loss_and_adam_as_their_train_py_takes_it(
        bdda, saturate):
    _, prepared = bdda
    batch = _batch(prepared)
    torch.manual_seed(0)
    model = SalMM(clip=None, backend="builtin")
    if saturate:             # the final layer's bias drives many pixels to exactly 0.0 and 1.0
        with torch.no_grad():
            model.final.bias.fill_(0.0)
            model.final.weight.mul_(400.0)
    theirs = copy.deepcopy(model)
    cfg = TrainConfig(prepared=str(prepared), cached_clip=True)
    rt = train_runtime.Runtime(0, 1, torch.device("cpu"), None)
    ours_opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    result = train_loop.train_epoch(model, [batch], None, ours_opt, scaler, rt, 0, 0, 1, 4, None)

    # their train.py: criterion = nn.BCELoss(); Adam(params, lr, weight_decay); one step
    their_opt = torch.optim.Adam(theirs.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
    theirs.train()
    output = theirs(batch["frame"].float() / 255, batch["emb"])
    if saturate:
        assert output.eq(1.0).any() and output.eq(0.0).any()
    loss = torch.nn.BCELoss()(output, batch["label"])
    their_opt.zero_grad()
    loss.backward()
    their_opt.step()

    assert abs(result.loss - loss.item()) <= 1e-6
    assert result.step == 1
    for (name, ours_p), theirs_p in zip(model.state_dict().items(), theirs.state_dict().values()):
        assert torch.isfinite(ours_p).all(), name
        assert (ours_p - theirs_p).abs().max() <= 1e-6, name
