"""The one command line: ``salmm <command>``, ``python -m salmm.<command>``, ``python -m
pipeline <command>`` - fast help that imports nothing heavy, -v/-q everywhere, one exit-code
policy, every option documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from salmm.cli import COMMANDS

HEAVY = ("torch", "open_clip", "cv2", "dask", "prefect", "zarr", "onnxruntime")
SALMM = ["train", "evaluate", "compare", "certify", "predict", "stream", "export", "official"]


def _help_imports(argv: list[str]) -> dict:
    """What ``salmm <argv>`` (a --help) printed and which heavy modules it imported."""
    code = (f"import sys, json, io, contextlib\nfrom salmm.cli import main\nout = io.StringIO()\n"
            f"with contextlib.redirect_stdout(out):\n    try:\n        main({argv!r})\n"
            f"    except SystemExit as e:\n        status = e.code\n"
            f"print(json.dumps({{'status': status, 'text': out.getvalue(), 'heavy': "
            f"[m for m in {HEAVY!r} if m in sys.modules]}}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_salmm_help_lists_every_command_without_importing_them():
    found = _help_imports(["--help"])
    assert found["status"] == 0 and found["heavy"] == []
    assert all(name in found["text"] for name in COMMANDS)


@pytest.mark.parametrize("command", SALMM)
def test_command_help_imports_nothing_heavy_and_shows_defaults(command):
    found = _help_imports([command, "--help"])
    assert found["status"] == 0
    assert found["heavy"] == []
    assert "--verbose" in found["text"] and "--quiet" in found["text"]


def test_train_help_shows_the_recipe_defaults():
    text = _help_imports(["train", "--help"])["text"]
    for shown in ("(default: 100)", "(default: 32)", "(default: 0.001)", "(default: 42)",
                  "(default ViT-B-32)", "(default: off)"):
        assert shown in text, shown


def test_stream_and_export_offer_only_the_options_they_use():
    stream = _help_imports(["stream", "--help"])["text"]
    export = _help_imports(["export", "--help"])["text"]
    assert "--cached-clip" not in stream and "--cache " not in stream
    assert "--amp" not in export and "--cached-clip" not in export


@pytest.mark.parametrize("argv", [["salmm.official"], ["salmm.train"], ["pipeline", "verify"]])
def test_python_m_help_still_works(argv):
    done = subprocess.run([sys.executable, "-m", *argv, "--help"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0 and "usage:" in done.stdout


def test_bad_input_is_one_line_and_exit_2_in_every_front_end(tmp_path):
    missing = tmp_path / "nothing.tar"
    for argv in (["-m", "salmm.cli", "official", str(missing)],
                 ["-m", "salmm.official", str(missing)],
                 ["-m", "salmm.cli", "-q", "normalize", "--dataset", "bdda", "--root",
                  str(tmp_path / "no-root"), "--out", str(tmp_path / "out")],
                 ["-m", "pipeline", "normalize", "-q", "--dataset", "bdda", "--root",
                  str(tmp_path / "no-root"), "--out", str(tmp_path / "out")]):
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                              timeout=300, check=False)
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
        assert done.returncode == 2, (argv, done.stderr)
        assert len(errors) == 1 and str(tmp_path) in errors[0], (argv, done.stderr)


def test_usage_errors_exit_2_before_any_heavy_import():
    found = _help_imports(["evaluate", "--prepared", "p", "--out", "o"])   # no --checkpoint
    assert found["status"] == 2 and found["heavy"] == []                 # nor --baseline


@pytest.mark.slow
def test_salmm_prepare_runs_the_flow_to_the_bytes_normalize_writes(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)

    def salmm(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "salmm.cli", "-q", *argv], env=env,
                              capture_output=True, text=True, timeout=600, check=False)

    assert salmm("synth", "--dataset", "bdda", "--out", str(tmp_path / "raw"), "--videos", "3",
                 "--frames", "4").returncode == 0
    def prepare() -> subprocess.CompletedProcess:    # the flow, called as a plain function
        return salmm("prepare", "--dataset", "bdda", "--root", str(tmp_path / "raw"), "--out",
                     str(tmp_path / "flow"), "--size", "64x64", "--clip-pretrained", "none",
                     "--workers", "1")

    flow = prepare()
    direct = salmm("normalize", "--dataset", "bdda", "--root", str(tmp_path / "raw"), "--out",
                   str(tmp_path / "direct"), "--size", "64x64", "--workers", "1")
    assert flow.returncode == 0 and direct.returncode == 0, flow.stderr + direct.stderr
    assert not [line for line in flow.stderr.splitlines() if line.startswith("INFO")]   # -q
    manifest = (tmp_path / "flow" / "manifest.json").read_bytes()
    assert manifest == (tmp_path / "direct" / "manifest.json").read_bytes()
    shards = {p.name: p.read_bytes() for p in (tmp_path / "flow").glob("*.tar")}
    again = prepare()                 # idempotent: the finished output resumed, same bytes
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "flow" / "manifest.json").read_bytes() == manifest
    assert {p.name: p.read_bytes() for p in (tmp_path / "flow").glob("*.tar")} == shards
    assert (tmp_path / "flow" / "clip" / "ViT-B-32-salmm-random-seed0.zarr").is_dir()
