"""The embedded default: a local Prefect server on loopback and the deployment server.

``python -m flows.local`` starts both in the foreground and stops them on Ctrl-C:

- a Prefect server (SQLite database, bound to 127.0.0.1, analytics off) whose home is the
  project-local folder ``.salmm/prefect`` (``--home`` to change it);
- ``python -m flows.serve``, which serves the ``prepare/<dataset>`` deployments.

Users with an existing Prefect server or Prefect Cloud set ``PREFECT_API_URL`` instead; then no
server is started and only the deployments are served.

The same pieces are a context manager, :func:`local_services`, used by the quickstart and the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from flows.config import DEPLOYMENT_NAMES

log = logging.getLogger(__name__)

DEFAULT_HOME = Path(".salmm") / "prefect"
DEFAULT_PORT = 4200


@dataclass
class Services:
    """Processes started by :func:`local_services` and the environment that reaches them."""

    api_url: str
    env: dict[str, str]
    ui_url: str | None = None
    processes: list[subprocess.Popen] = field(default_factory=list)


def prefect_env(home: Path, api_url: str) -> dict[str, str]:
    """Environment for every Prefect process we start: project-local home, no telemetry.

    Args:
        home: the Prefect home folder (database, logs, profiles).
        api_url: ``http://127.0.0.1:PORT/api`` of the server the processes talk to.
    """
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home.resolve()),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY="false",
        PREFECT_UI_SHOW_PROMOTIONAL_CONTENT="false",
        # `prefect deployment run ... --watch` streams the run's log lines (a failing run's
        # reason among them) only from a server that publishes them; Prefect's default is off
        PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED="true",
        PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED="true",
    )
    return env


def free_port(preferred: int) -> int:
    """``preferred`` if nothing listens on it on 127.0.0.1, otherwise a free port the OS picks."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]


def wait_healthy(
    api_url: str, timeout_s: float = 120.0, process: subprocess.Popen | None = None
) -> None:
    """Block until ``GET {api_url}/health`` answers 200.

    Raises:
        RuntimeError: the server process exited, or ``timeout_s`` seconds passed.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"the Prefect server exited with code {process.returncode} before it was healthy"
            )
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect server at {api_url} was not healthy after {timeout_s:.0f} s")


def _start(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, its output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """Stop a process started by :func:`_start` and everything in its process group."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0f s of SIGTERM: killed",
                    " ".join(map(str, process.args[-3:])), timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_deployments(
    env: dict[str, str],
    names: list[str],
    timeout_s: float = 120.0,
    process: subprocess.Popen | None = None,
) -> None:
    """Block until the server knows every deployment in ``names`` (``flow/deployment``)."""
    deadline = time.monotonic() + timeout_s
    missing = list(names)
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the deployment server exited with code {process.returncode}")
        listing = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "ls"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        missing = [n for n in names if n not in listing.stdout]
        if listing.returncode == 0 and not missing:
            return
        time.sleep(1.0)
    raise RuntimeError(f"deployments not served after {timeout_s:.0f} s: {', '.join(missing)}")


@contextlib.contextmanager
def local_services(
    home: Path = DEFAULT_HOME, port: int = DEFAULT_PORT, serve: bool = True
) -> Iterator[Services]:
    """Start a local Prefect server (unless ``PREFECT_API_URL`` is set) and the deployment server.

    Everything started here is stopped on exit, by process group.

    Args:
        home: project-local Prefect home; its ``logs/`` holds the server and serve logs.
        port: preferred server port on 127.0.0.1 (another free port if it is taken).
        serve: also start ``python -m flows.serve`` and wait until its deployments are registered.
    """
    home = Path(home)
    logs = home / "logs"
    services: Services
    external = os.environ.get("PREFECT_API_URL")
    started: list[subprocess.Popen] = []
    try:
        if external:
            services = Services(api_url=external, env=dict(os.environ))
            log.info("using the Prefect server at %s (PREFECT_API_URL)", external)
        else:
            port = free_port(port)
            api_url = f"http://127.0.0.1:{port}/api"
            env = prefect_env(home, api_url)
            server = _start(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                env,
                logs / "server.log",
            )
            started.append(server)
            wait_healthy(api_url, process=server)
            services = Services(api_url=api_url, env=env, ui_url=f"http://127.0.0.1:{port}")
            log.info("Prefect server ready: UI %s (log %s)", services.ui_url, logs / "server.log")
        services.processes = started
        if serve:
            server_proc = _start(
                [sys.executable, "-m", "flows.serve"], services.env, logs / "serve.log"
            )
            started.append(server_proc)
            wait_deployments(services.env, DEPLOYMENT_NAMES, process=server_proc)
            log.info(
                "serving deployments %s (log %s)", ", ".join(DEPLOYMENT_NAMES), logs / "serve.log"
            )
        yield services
    finally:
        for process in reversed(started):
            stop(process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.local", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--home", type=Path, default=DEFAULT_HOME, help="Prefect home folder (default %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="preferred server port (default %(default)s)"
    )
    parser.add_argument(
        "--no-serve", dest="serve", action="store_false",
        help="the Prefect server only, without the deployment server: for deployments on a work"
        " pool (flows/prefect.yaml) run by `prefect worker start`",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # `kill PID` (SIGTERM), a closed terminal (SIGHUP) and Ctrl-C (SIGINT) all stop the
    # services this process started, whenever they come: it owns them
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _stop_on_signal)
    try:
        with local_services(args.home, args.port, serve=args.serve) as services:
            log.info(
                "ready: PREFECT_API_URL=%s — run e.g. `prefect deployment run prepare/bdda"
                " --watch` with that variable set; Ctrl-C or `kill %d` stops everything",
                services.api_url, os.getpid(),
            )
            while all(p.poll() is None for p in services.processes):
                time.sleep(1.0)
    except Stopped as err:
        log.info("stopped (%s): the Prefect server and the deployment server are down", err)
    return 0


class Stopped(BaseException):
    """A stop signal arrived (its name is the message). A BaseException, as KeyboardInterrupt
    is: the signal can land inside code that catches Exception (logging's handlers do, to
    print a logging error and go on), which must not swallow it."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _stop_on_signal(number: int, _frame: object) -> None:
    """The first stop signal unwinds to the services' cleanup; later ones are ignored, so a
    second Ctrl-C cannot cut the cleanup short and orphan a server."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    raise Stopped(signal.Signals(number).name)


if __name__ == "__main__":
    raise SystemExit(main())
