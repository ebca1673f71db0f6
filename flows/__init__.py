"""Prefect orchestration of the pipeline (``prepare/<dataset>`` deployments) and the quickstart.

A flow called as a plain function without ``PREFECT_API_URL`` runs on Prefect's ephemeral server,
which Prefect gives 20 s to start; on a loaded 2-core machine it can take longer (measured: a
timeout while the machine ran normalize's workers). Unless the user set it, the wait is 180 s,
and that server sends no telemetry (its heartbeat writes compete for the database with the
flow's own writes, and fail on a machine without internet).
"""

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
