"""``python -m bench.gpu``, the GPU check, where there is no GPU: its help, and one line with
exit status 2 instead of a traceback. (Its figures need a CUDA device; ``--device cpu
--small`` rehearses it, see the README.)"""

import pytest
import torch

from bench import gpu


def test_help_names_the_summary_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu.main(["--help"])
    assert exit_.value.code == 0
    assert "GPU check" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("argv", [[], ["--device", "cpu"]], ids=["default", "cpu-without-small"])
def test_without_cuda_one_line_and_status_2(capsys, argv):
    assert gpu.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA device" in lines[0]
    assert captured.out == ""


def test_a_part_whose_package_is_missing_is_skipped_in_one_line(capsys, monkeypatch):
    """On a GPU machine that lacks an optional package (its own torch, few wheels carried),
    the parts that need it are skipped with one line naming it; the rest still run."""
    monkeypatch.setitem(__import__("sys").modules, "open_clip", None)  # import now fails
    monkeypatch.delitem(__import__("sys").modules, "pipeline.encoders.clip", raising=False)
    assert gpu.part("CLIP cache", gpu.embedding_cache, torch.device("cpu"), gpu.SMALL, 1) is None
    line = capsys.readouterr().out.strip()
    assert line.startswith("CLIP cache: skipped") and "'open_clip'" in line
