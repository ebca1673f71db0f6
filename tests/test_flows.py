"""The prepare flow: configuration, plain-function (ephemeral) mode, and the real served deployments.

The served test starts a real Prefect server on loopback and ``python -m flows.serve``, runs
``prefect deployment run prepare/bdda --watch`` exactly as a user would, and stops everything it
started by process group.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from flows.config import deployment_parameters
from flows.local import local_services
from pipeline.core.errors import BadInputError
from pipeline.datasets.splits import read_split
from pipeline.formats.clip_cache import open_cache
from pipeline.formats.manifest import read_manifest, version_id
from pipeline.verify import verify

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(tmp_path: Path):
    """No PREFECT_*/SALMM_* settings from the developer's shell leak into a test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SALMM_"))}
    with mock.patch.dict(os.environ, env, clear=True):
        yield


def test_deployment_defaults_come_from_config_file_and_environment(
    tmp_path: Path, clean_env
) -> None:
    config = tmp_path / "flows.toml"
    config.write_text(
        'data_root = "/data/gaze"\nclip_pretrained = "/models/vit.pt"\n[bdda]\nroot = "/mnt/bdda"\n'
        '[dreyeve]\nground_truth = "saliency"\n'
    )
    os.environ["SALMM_CONFIG"] = str(config)
    os.environ["SALMM_PREPARED_ROOT"] = "/fast/prepared"
    bdda = deployment_parameters("bdda")
    assert bdda["root"] == "/mnt/bdda"
    assert bdda["out"] == "/fast/prepared/bdda"
    assert bdda["clip_pretrained"] == "/models/vit.pt"
    traffic = deployment_parameters("trafficgaze")
    assert traffic["root"] == "/data/gaze/TrafficGaze"
    assert traffic["dataset"] == "trafficgaze"
    assert traffic["ground_truth"] is None and bdda["ground_truth"] is None
    dreyeve = deployment_parameters("dreyeve")
    assert dreyeve["root"] == "/data/gaze/DREYEVE_DATA"
    assert dreyeve["ground_truth"] == "saliency"


def test_unknown_config_key_is_refused_naming_the_file(tmp_path: Path, clean_env) -> None:
    config = tmp_path / "flows.toml"
    config.write_text('data_rot = "/typo"\n')
    os.environ["SALMM_CONFIG"] = str(config)
    with pytest.raises(BadInputError, match=r"flows\.toml: unknown setting\(s\) data_rot"):
        deployment_parameters("bdda")


def _corrupt_first_test_frame(root: Path) -> str:
    name = read_split(root / "test.json")[0]
    frame = root / "camera_frames" / name
    frame.write_bytes(frame.read_bytes()[:200])
    return name


def _run_deployment(env: dict[str, str], *params: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "prefect", "deployment", "run", "prepare/bdda", "--watch"]
    for param in params:
        cmd += ["--param", param]
    return subprocess.run(            # a wide terminal: Rich wraps long log lines otherwise
        cmd, env={**env, "COLUMNS": "400"}, capture_output=True, text=True, check=False,
        timeout=420, cwd=REPO
    )


def _flow_run_id(output: str) -> str:
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert found, output
    return found.group(1)


@pytest.fixture(scope="module")
def served(tmp_path_factory, synth_dataset):
    """One local Prefect server and `flows.serve` for the served-deployment tests, with the
    five synthetic datasets under one data root (its flows.toml: random CLIP weights, 64x64,
    one worker) and no CLIP weights host (a closed port on loopback, no proxy: the offline
    case). Yields (data root, services); each test writes outputs of its own."""
    from flows.config import RAW_DIRNAMES

    root = tmp_path_factory.mktemp("served")
    for dataset, dirname in RAW_DIRNAMES.items():
        frames = {"bdda": 4, "dreyeve": 17, "dada": 2}.get(dataset, 6)   # the fewest listed
        shutil.copytree(synth_dataset(dataset, videos=3, frames=frames), root / dirname)
    config = root / "flows.toml"
    config.write_text(
        f'data_root = "{root}"\nprepared_root = "{root / "prepared"}"\n'
        'clip_pretrained = "none"\nsize = "64x64"\nworkers = 1\n'
    )
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "SALMM_"))
           and k not in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")}
    env.update(SALMM_CONFIG=str(config), HF_ENDPOINT="http://127.0.0.1:9")
    with mock.patch.dict(os.environ, env, clear=True), \
            local_services(home=root / "prefect", port=4311) as services:
        yield root, services


@pytest.mark.slow
def test_served_deployment_runs_and_fails_cleanly(served) -> None:
    tmp_path, services = served
    raw = tmp_path / "BDDA"
    out = tmp_path / "prepared" / "bdda"
    run = _run_deployment(services.env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Completed" in run.stdout
    
    assert verify(str(out)) == []
    manifest = read_manifest(str(out))
    published = json.loads((out / "published.json").read_text())
    assert published["version_id"] == version_id(manifest)
    cache = open_cache(published["cache"]["path"], str(out))
    assert cache.identity["prepared"]["version_id"] == version_id(manifest)
    artifact = subprocess.run(
        [sys.executable, "-m", "prefect", "artifact", "inspect", "prepare-bdda"],
        env=services.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert published["version_id"] in artifact.stdout
    
    bad_root = Path(shutil.copytree(raw, tmp_path / "BDDA-bad"))
    bad_name = _corrupt_first_test_frame(bad_root)
    failed = _run_deployment(
        services.env, f"root={bad_root}", f"out={tmp_path / 'prepared-bad'}"
    )
    assert failed.returncode != 0
    assert "Failed" in failed.stdout + failed.stderr
    logs = subprocess.run(
        [sys.executable, "-m", "prefect", "flow-run", "logs", _flow_run_id(failed.stdout)],
        env=services.env,
        capture_output=True,
        text=True,
        check=False,
    )
    reason = [line for line in logs.stdout.splitlines() if bad_name in line]
    assert reason, logs.stdout
    assert not (tmp_path / "prepared-bad" / "manifest.json").exists()
    # the reason is on the --watch screen too, as the flow's own one line
    assert any(bad_name in line for line in failed.stdout.splitlines()), failed.stdout

    offline = _run_deployment(services.env, f"out={tmp_path / 'prepared-offline'}",
                              "clip_pretrained=openai")
    assert offline.returncode != 0
    screen = [line for line in offline.stdout.splitlines()   # the flow's own one line
              if "could not get the ViT-B-32 weights" in line and "Error" not in line]
    assert screen, offline.stdout
    assert "--param clip_pretrained=none" in screen[0]
    assert "--clip-pretrained" not in screen[0]
    assert not (tmp_path / "prepared-offline").exists()      # checked before any work


def _process_groups() -> dict[int, int]:
    """{pid: process group} of every process on the machine."""
    groups = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        groups[int(stat.parent.name)] = int(fields[2])
    return groups


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in text:
            found.append(int(status.parent.name))
    return found


def test_a_stop_signal_during_a_log_line_still_stops_flows_local() -> None:
    """The signal lands while logging writes a line (the "ready:" line a test or a supervisor
    waits for): logging's handlers catch Exception to report their own errors and carry on,
    which must not swallow the stop and leave flows.local running with the signals ignored."""
    import logging
    import signal

    from flows import local

    class SignalOnEmit(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                os.kill(os.getpid(), signal.SIGHUP)
                for _ in range(1000):  # the handler runs between two bytecodes in here
                    pass
            except Exception:  # noqa: BLE001 (what logging.StreamHandler.emit does)
                self.handleError(record)

    previous = {number: signal.getsignal(number) for number in local.STOP_SIGNALS}
    logger = logging.getLogger("test-stop-signal")
    logger.addHandler(SignalOnEmit())
    logger.propagate = False
    try:
        for number in local.STOP_SIGNALS:
            signal.signal(number, local._stop_on_signal)
        with pytest.raises(local.Stopped, match="SIGHUP"):
            logger.warning("ready: ...")
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_flows_local_stops_everything_it_started_on_a_stop_signal(tmp_path: Path, clean_env,
                                                                   stop: str) -> None:
    import signal

    # the whole stack (a Prefect server and flows.serve) once; the other two signals take the
    # same handler (flows.local installs one for each), so they are sent to a flows.local that
    # uses an outside server (PREFECT_API_URL) and starts nothing: a clean stop, in seconds
    stack = stop == "SIGTERM"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not stack:
        env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"
    local = subprocess.Popen(
        [sys.executable, "-m", "flows.local", "--home", str(tmp_path / "prefect"), "--port",
         "4312", *([] if stack else ["--no-serve"])], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=env)
    # flows.local sets its own handler for each stop signal, even where its parent (a shell's
    # background job) ignores SIGINT
    lines = []
    try:
        for line in local.stdout:
            lines.append(line)
            if line.startswith("ready:"):
                break
        assert lines and lines[-1].startswith("ready:"), "".join(lines)
        started = _children(local.pid)              # the Prefect server and flows.serve
        assert len(started) == (2 if stack else 0), (started, "".join(lines))
        groups = {_process_groups()[pid] for pid in started}
        local.send_signal(getattr(signal, stop))
        rest, _ = local.communicate(timeout=120)
    finally:
        if local.poll() is None:
            local.kill()
    assert local.returncode == 0, "".join(lines) + rest
    assert f"stopped ({stop})" in rest
    survivors = [pid for pid, group in _process_groups().items() if group in groups]
    assert survivors == [], survivors
    assert "did not stop" not in rest               # each answered SIGTERM: none was killed


@pytest.mark.slow
def test_concurrent_runs_on_other_outputs_complete_and_a_held_output_is_refused_in_one_line(
        served) -> None:
    from flows.config import RAW_DIRNAMES
    from pipeline.core.fsio import Folder

    tmp_path, services = served
    outs = {dataset: tmp_path / "side-by-side" / dataset for dataset in RAW_DIRNAMES}
    runs = {dataset: subprocess.Popen(
        [sys.executable, "-m", "prefect", "deployment", "run", f"prepare/{dataset}",
         "--watch", "--param", f"out={outs[dataset]}"], env={**services.env, "COLUMNS": "400"},
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for dataset in RAW_DIRNAMES}
    outputs = {dataset: run.communicate(timeout=600)[0] for dataset, run in runs.items()}
    for dataset, run in runs.items():
        assert run.returncode == 0, outputs[dataset]
        assert verify(str(outs[dataset])) == []

    held = tmp_path / "held"
    with Folder(held).lock():                   # another run is writing there
        refused = _run_deployment(services.env, f"out={held}")
    assert refused.returncode != 0
    reason = [line for line in refused.stdout.splitlines()
              if "another run is writing here" in line and "Error" not in line]
    assert len(reason) == 1, refused.stdout
    assert not (held / "manifest.json").exists()


@pytest.mark.slow
def test_prefect_yaml_registers_on_a_process_pool_and_a_worker_runs_one(
        tmp_path: Path, synth_dataset, clean_env) -> None:
    """Prefect 3's documented path for teams: `prefect deploy --all` from flows/prefect.yaml
    onto a process work pool, `prefect worker start`, a run to Completed; root and out come
    from the worker's environment."""
    import signal

    shutil.copytree(synth_dataset("bdda", videos=3, frames=4), tmp_path / "BDDA")
    with local_services(home=tmp_path / "prefect", port=4314, serve=False) as services:
        env = {**services.env, "SALMM_DATA_ROOT": str(tmp_path), "COLUMNS": "400",
               "SALMM_PREPARED_ROOT": str(tmp_path / "prepared"),
               "PREFECT_WORKER_QUERY_SECONDS": "1", "PYTHONPATH": str(REPO)}

        def prefect(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=REPO,
                                  capture_output=True, text=True, check=False, timeout=300)

        created = prefect("work-pool", "create", "salmm", "--type", "process")
        assert created.returncode == 0, created.stdout + created.stderr
        deployed = prefect("--no-prompt", "deploy", "--all", "--prefect-file",
                           "flows/prefect.yaml")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        listed = prefect("deployment", "ls")
        assert all(name in listed.stdout for name in
                   ("prepare/bdda", "prepare/trafficgaze", "prepare/drfixd-rainy",
                    "prepare/dreyeve", "prepare/dada"))
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool",
                                   "salmm"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            run = prefect("deployment", "run", "prepare/bdda", "--watch", "--param",
                          "clip_pretrained=none", "--param", "size=64x64", "--param",
                          "workers=1")
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
    assert run.returncode == 0 and "Completed" in run.stdout, run.stdout + run.stderr
    assert verify(str(tmp_path / "prepared" / "bdda")) == []
