"""Official checkpoint format: loading with every key checked, refusals, round trip, CLI."""

import argparse
import logging

import pytest
import torch

from pipeline.core.errors import BadInputError
from salmm.model.net import SalMM
from salmm.model.official import load_official, read_official, save_official
from salmm.official import main
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def trained_state():
    """A SalMM state with every value moved off its initialisation."""
    torch.manual_seed(0)
    model = SalMM()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.state_dict()


def write_published(path, state, **extra):
    """A checkpoint as the authors' train.py writes it (valid_loss is a tensor there)."""
    torch.save(
        {
            "epoch": 17,
            "state_dict": state,
            "optim_dict": {"state": {}, "param_groups": []},
            "valid_loss": torch.tensor(0.125),
            **extra,
        },
        path,
    )
    return path


def assert_same_weights(model, state):
    got = model.state_dict()
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_published_checkpoint_loads_every_key(tmp_path, trained_state):
    path = write_published(tmp_path / "model_best_salmm_incomplete.tar", trained_state)
    official = read_official(path)
    assert official.epoch == 17 and official.valid_loss == 0.125
    assert official.ignored_clip_keys == 0
    assert_same_weights(load_official(path), trained_state)


def test_complete_checkpoint_clip_keys_are_ignored(tmp_path, trained_state):
    state = dict(trained_state)
    state["CrossModelAtt.model.visual.conv1.weight"] = torch.zeros(768, 3, 32, 32)
    state["CrossModelAtt.model.logit_scale"] = torch.tensor(4.6)
    path = write_published(tmp_path / "complete.tar", state)
    assert read_official(path).ignored_clip_keys == 2
    assert_same_weights(load_official(path), trained_state)


def test_round_trip_through_our_writer(tmp_path, trained_state):
    model = SalMM()
    model.load_state_dict(trained_state)
    path = tmp_path / "ours.tar"
    save_official(path, model, epoch=3, valid_loss=0.5)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"epoch", "state_dict", "optim_dict", "valid_loss"}
    assert raw["epoch"] == 3 and raw["valid_loss"] == 0.5
    assert_same_weights(load_official(path), trained_state)


def corrupt(state, kind):
    state = dict(state)
    if kind == "missing":
        del state["encoder4.0.mamba1.A_b_log"]
    elif kind == "extra":
        state["encoder7.0.weight"] = torch.zeros(3)
    elif kind == "shape":
        state["conv5.weight"] = torch.zeros(24, 24, 3, 3)
    elif kind == "prefix":
        state = {"module." + k: v for k, v in state.items()}
    return state


@pytest.mark.parametrize(
    "kind, offender",
    [
        ("missing", "1 missing (encoder4.0.mamba1.A_b_log)"),
        ("extra", "1 unexpected (encoder7.0.weight)"),
        ("shape", "conv5.weight [24, 24, 3, 3] vs model [24, 48, 3, 3]"),
        ("prefix", "'module.' prefix"),
    ],
)
def test_mismatched_checkpoint_is_refused_naming_file_and_offenders(
    tmp_path, trained_state, kind, offender
):
    path = write_published(tmp_path / f"{kind}.tar", corrupt(trained_state, kind))
    with pytest.raises(BadInputError) as err:
        load_official(path)
    message = str(err.value)
    assert message.startswith(f"{path}: state_dict does not match SalMM")
    assert offender in message and "\n" not in message


def test_long_offender_lists_are_shortened(tmp_path, trained_state):
    state = {k: v for k, v in trained_state.items() if not k.startswith("encoder4.")}
    path = write_published(tmp_path / "half.tar", state)
    with pytest.raises(BadInputError, match=r"missing \(.*, \.\.\. and \d+ more\)"):
        read_official(path)


def test_unreadable_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(BadInputError, match="garbage.tar"):
        load_official(garbage)
    with pytest.raises(BadInputError, match="no such checkpoint"):
        load_official(tmp_path / "absent.tar")
    unsafe = tmp_path / "unsafe.tar"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, unsafe)  # not weights-only
    with pytest.raises(BadInputError, match="unsafe.tar"):
        load_official(unsafe)


def test_cli_reports_epoch_loss_and_keys(tmp_path, trained_state, caplog):
    path = write_published(tmp_path / "ok.tar", trained_state)
    caplog.set_level(logging.INFO)
    assert main([str(path), "--check"]) == 0
    text = caplog.text
    assert "epoch       17" in text and "valid_loss  0.125" in text
    assert "all 578 SalMM keys present" in text and "ok" in text
    bad = write_published(tmp_path / "bad.tar", corrupt(trained_state, "missing"))
    assert main([str(bad)]) == 2          # bad input: the one exit-code policy
    assert "bad.tar: state_dict does not match SalMM" in caplog.text
