"""Checkpoint files: weights_only round trip, generator states, atomic replace, bad files."""

from __future__ import annotations

import pickle
import random
import re

import numpy as np
import pytest
import torch

from pipeline.core.errors import BadInputError
from salmm.model.checkpoint import (
    git_commit,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _draws() -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)],
            np.random.randn())


def test_round_trip_with_weights_only_and_optimizer_state(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    checkpoint = {"epoch": 2, "state_dict": model.state_dict(), "optim_dict": optimizer.state_dict(),
                  "valid_loss": 0.25, "config": {"size": [64, 64], "cache": None},
                  "history": [{"epoch": 1, "CC": 0.5}], "rng": rng_state()}
    save_checkpoint(tmp_path / "c.pt", checkpoint)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["epoch"] == 2 and loaded["valid_loss"] == 0.25
    assert loaded["config"] == checkpoint["config"] and loaded["history"] == checkpoint["history"]
    for name, value in model.state_dict().items():
        assert torch.equal(loaded["state_dict"][name], value)
    other = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    other.load_state_dict(loaded["optim_dict"])
    assert other.state_dict()["param_groups"][0]["weight_decay"] == 1e-4
    assert torch.equal(other.state_dict()["state"][0]["exp_avg"],
                       optimizer.state_dict()["state"][0]["exp_avg"])


def test_restored_generators_repeat_the_same_draws(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.randn()                 # leave a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "r.pt", {"state_dict": {}, "rng": rng_state()})
    first = _draws()
    _draws()
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert _draws() == first


def test_save_replaces_atomically_and_a_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"state_dict": {}, "epoch": 1})
    save_checkpoint(path, {"state_dict": {}, "epoch": 2})
    assert load_checkpoint(path)["epoch"] == 2
    with pytest.raises((pickle.PicklingError, AttributeError)):
        save_checkpoint(path, {"state_dict": {}, "epoch": 3, "bad": lambda: None})
    assert load_checkpoint(path)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_missing_corrupt_and_unsafe_files_are_one_line_errors(tmp_path):
    with pytest.raises(BadInputError, match=r"nope\.pt: no such checkpoint$"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(BadInputError, match=r"junk\.pt: not a readable checkpoint") as err:
        load_checkpoint(tmp_path / "junk.pt")
    assert "\n" not in str(err.value)
    torch.save({"state_dict": {}, "obj": np.dtype("float32").type}, tmp_path / "unsafe.pt")
    with pytest.raises(BadInputError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "unsafe.pt")      # weights_only refuses arbitrary objects
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(BadInputError, match="has no state_dict"):
        load_checkpoint(tmp_path / "other.pt")


def test_git_commit_is_a_hash_in_a_checkout_and_none_elsewhere(tmp_path):
    assert git_commit(tmp_path) is None
    commit = git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
