"""Runs from a configuration file (--config / --print-config): a printed configuration makes
the same run, flags override the file, a run's config.json is a valid file, and a bad file is
one line with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from salmm import cli, compare, stream, train


def printed(capsys, main, argv) -> str:
    capsys.readouterr()
    assert main([*argv, "--print-config"]) == 0
    return capsys.readouterr().out


def test_a_printed_configuration_makes_the_same_run(commands_prepared, tmp_path, capsys):
    first = tmp_path / "first"
    assert train.main(["--cached-clip", "--prepared", str(commands_prepared),
                       "--clip-pretrained", "none", "--size", "64x64", "--epochs", "1",
                       "--batch-size", "4", "--lr", "0.002", "--workers", "0",
                       "--out", str(first)]) == 0
    recorded = json.loads((first / "config.json").read_text())
    # the run's config.json is a --config file; the flag after it overrides its out
    text = printed(capsys, train.main, ["--config", str(first / "config.json"),
                                        "--out", str(tmp_path / "second")])
    assert 'size = "64x64"' in text and 'clip_pretrained = "none"' in text
    (tmp_path / "run.toml").write_text(text)
    assert printed(capsys, train.main, ["--config", str(tmp_path / "run.toml")]) == text
    assert train.main(["--config", str(tmp_path / "run.toml")]) == 0
    again = json.loads((tmp_path / "second" / "config.json").read_text())
    assert {**again["config"], "out": None} == {**recorded["config"], "out": None}
    assert again["dataset_version"] == recorded["dataset_version"]


def test_flags_override_the_file_and_the_dispatcher_takes_it_too(tmp_path, capsys):
    (tmp_path / "run.toml").write_text('prepared = "data/p"\nepochs = 3\nsize = "96x64"\n'
                                       'cached-clip = true\n')
    text = printed(capsys, cli.main, ["train", "--config", str(tmp_path / "run.toml"),
                                      "--epochs", "7"])
    assert "epochs = 7" in text and 'size = "96x64"' in text and "cached_clip = true" in text
    assert 'prepared = "data/p"' in text


def test_a_list_on_the_command_line_replaces_the_files(tmp_path, capsys):
    (tmp_path / "cmp.toml").write_text('prepared = ["a", "b"]\nbaseline = ["center"]\n'
                                       'out = "o"\n')
    text = printed(capsys, compare.main, ["--config", str(tmp_path / "cmp.toml"),
                                          "--prepared", "c"])
    assert 'prepared = ["c"]' in text and 'baseline = ["center"]' in text


@pytest.mark.parametrize("content, problem", [
    ('prepared = "p"\nepoch = 3\n', "unknown setting(s) epoch"),
    ('prepared = "p"\nsize = "big"\n', "size: size must look like 256x256"),
    ('prepared = "p"\norder = "random"\n', "order: 'random' is not one of permutation, stream"),
    ('prepared = "p"\ncached_clip = "yes"\n', "cached_clip: must be true or false"),
    ("prepared = \n", "not valid TOML"),
])
def test_a_bad_file_is_one_line_and_status_2(tmp_path, capsys, content, problem):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--config", str(path)])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{path}: " in lines[0] and problem in lines[0]


def test_stream_prints_a_configuration_it_reads_back(tmp_path, capsys):
    argv = ["--checkpoint", "ckpt.pt", "--input", "0", "--refresh-every", "8", "--size",
            "256x256", "--clip-pretrained", "none"]
    text = printed(capsys, stream.main, argv)
    Path(tmp_path / "s.toml").write_text(text)
    assert printed(capsys, stream.main, ["--config", str(tmp_path / "s.toml")]) == text
    assert "refresh_every = 8" in text
