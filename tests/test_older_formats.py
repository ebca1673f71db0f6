"""Outputs made before the fidelity release (JPEG frames, CLIP with GELU, in-frame fixations only)
are refused in one line that says how to make them again: prepared folders, CLIP caches,
training checkpoints, exports; and a cache whose CLIP ran with the other activation."""

from __future__ import annotations

import json

import pytest
import torch
import zarr

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.encoders.clip import ClipSpec, activation
from pipeline.formats.clip_cache import FORMAT, CacheWriter, check_cache, open_cache
from pipeline.formats.manifest import read_manifest, version_id
from salmm.model.checkpoint import FORMAT as CHECKPOINT_FORMAT
from salmm.model.checkpoint import load_checkpoint


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_a_format_1_prepared_folder_names_the_command_that_remakes_it(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "salmm-prepared",
                                                        "format_version": 1}))
    with pytest.raises(BadInputError) as err:
        read_manifest(str(tmp_path))
    text = one_line(err)
    assert "format version 1" in text and "python -m pipeline normalize" in text
    assert "--overwrite" in text and "python -m pipeline embed" in text


def test_a_format_1_cache_is_refused_saying_to_re_embed(tmp_path):
    store = tmp_path / "old.zarr"
    zarr.open_group(str(store), mode="w").attrs.update({"format": FORMAT, "format_version": 1})
    with pytest.raises(BadInputError) as err:
        open_cache(store)
    text = one_line(err)
    assert "GELU" in text and "python -m pipeline embed --overwrite" in text


def test_a_cache_made_with_the_other_activation_is_refused(tmp_path):
    manifest = {"format": "salmm-prepared", "format_version": 2, "splits": {},
                "options": {"size": {"height": 8, "width": 8}}}
    encoder = {"model": "ViT-B-32", "weights": "openai", "profile": "salmm",
               "activation": "gelu", "open_clip": "3", "embed_dim": 4}
    writer = CacheWriter.open(tmp_path / "c.zarr", {
        "encoder": encoder, "dtype": "float32", "compute": {"device": "cpu"},
        "prepared": {"version_id": version_id(manifest)}, "software": {}, "splits": {},
        "chunk_size": 2})
    writer.finish()
    wanted = ClipSpec().identity()
    assert wanted["activation"] == "quickgelu"
    with pytest.raises(BadInputError) as err:
        check_cache(open_cache(tmp_path / "c.zarr"), manifest, **{
            k: wanted[k] for k in ("model", "profile", "weights", "activation")})
    assert "activation 'gelu'" in one_line(err)


def test_the_activation_follows_the_weights():
    assert activation("ViT-B-32", "openai") == "quickgelu"         # OpenAI's CLIP
    assert activation("ViT-B-32", None) == "quickgelu"             # the published architecture
    assert activation("ViT-B-32", "laion2b_s34b_b79k") == "gelu"   # trained with GELU
    assert activation("ViT-B-32-quickgelu", "metaclip_400m") == "quickgelu"
    assert activation("ViT-B-16", None) == "gelu"


def test_a_format_1_training_checkpoint_is_refused_saying_to_retrain(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": 1, "state_dict": {}}, path)
    with pytest.raises(BadInputError) as err:
        load_checkpoint(path)
    text = one_line(err)
    assert "GELU" in text and "python -m salmm.train" in text


def test_an_official_checkpoint_is_not_a_format_question(tmp_path):
    path = tmp_path / "model_best.tar"
    torch.save({"epoch": 3, "state_dict": {}, "valid_loss": 0.5}, path)
    assert load_checkpoint(path)["epoch"] == 3


def test_a_format_1_export_is_refused_saying_to_export_again(tmp_path, monkeypatch):
    from salmm.deploy import graphs as export

    Folder(tmp_path).write_bytes("export.json", json.dumps(
        {"format": export.FORMAT, "format_version": 1}).encode())
    loaded = type("Loaded", (), {"info": {"sha256": "x", "path": "c"}, "clip": ClipSpec()})()
    with pytest.raises(BadInputError) as err:
        export.checked_export(str(tmp_path), loaded, (256, 256))
    assert "export the checkpoint again" in one_line(err)
