"""CLIP encoder factory: preprocessing profiles, identity, freezing. Random weights, no network."""

import hashlib

import open_clip
import pytest
import torch
from torchvision.transforms import InterpolationMode, Resize
from torchvision.transforms import functional as TF

from pipeline.encoders.clip import build_clip_encoder, weights_identity
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def encoders():
    return {
        "salmm": build_clip_encoder("ViT-B-32", pretrained=None, profile="salmm", seed=0),
        "openclip": build_clip_encoder("ViT-B-32", pretrained=None, profile="openclip", seed=0),
    }


def frames(batch=2, h=90, w=160, seed=0):
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_salmm_profile_is_the_published_resize_without_normalisation(encoders):
    x = frames()
    published = Resize([224, 224])(x)  # SalMM.py: torch_resize = Resize([224, 224]); no Normalize
    assert torch.equal(encoders["salmm"].preprocess(x), published)
    explicit = TF.resize(x, [224, 224], InterpolationMode.BILINEAR, antialias=True)
    assert torch.equal(published, explicit)


def test_openclip_profile_uses_the_model_normalisation(encoders):
    x = frames()
    resized = TF.resize(x, [224, 224], InterpolationMode.BICUBIC, antialias=True)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(encoders["openclip"].preprocess(x), (resized - mean) / std)


def test_encode_shape_dtype_and_profiles_differ(encoders):
    x = frames()
    a, b = encoders["salmm"].encode(x), encoders["openclip"].encode(x)
    assert a.shape == (2, 512) and a.dtype == torch.float32 and not a.requires_grad
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


def test_random_weights_are_seeded(encoders):
    one, two = (encoders[k].visual.state_dict() for k in ("salmm", "openclip"))
    assert all(torch.equal(one[k], two[k]) for k in one)  # same seed -> same weights


def test_identity_names_model_weights_profile_and_version(encoders):
    assert encoders["salmm"].identity == {
        "model": "ViT-B-32",
        "weights": "random-seed0",
        "profile": "salmm",
        "activation": "quickgelu",
        "open_clip": open_clip.__version__,
        "embed_dim": 512,
    }
    assert encoders["openclip"].identity["profile"] == "openclip"


def test_weights_identity_of_tag_and_file(tmp_path):
    assert weights_identity("openai") == "openai"
    assert weights_identity(None, seed=3) == "random-seed3"
    path = tmp_path / "w.pt"
    path.write_bytes(b"weights")
    assert weights_identity(str(path)) == "sha256:" + hashlib.sha256(b"weights").hexdigest()


def test_encoder_is_frozen_and_stays_in_eval(encoders):
    enc = encoders["salmm"]
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.visual.training


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "float frames"),
        (torch.zeros(3, 8, 8), "float frames"),
        (torch.full((1, 3, 8, 8), 255.0), r"\[0, 1\]"),
    ],
)
def test_bad_frames_are_refused(encoders, bad, message):
    with pytest.raises(ValueError, match=message):
        encoders["salmm"].encode(bad)


def test_unknown_profile_is_refused():
    with pytest.raises(ValueError, match="profile"):
        build_clip_encoder(pretrained=None, profile="imagenet")
