"""Serve the ``prepare/<dataset>`` deployments: ``python -m flows.serve``.

Needs a reachable Prefect API (``PREFECT_API_URL``); ``python -m flows.local`` starts a local one and
this server together. Default parameters come from :mod:`flows.config`; override any per run with
``prefect deployment run prepare/bdda --param root=/data/BDDA``.
"""

from __future__ import annotations

import logging

from prefect import serve

from flows.config import RAW_DIRNAMES, deployment_parameters
from flows.prepare import prepare


def build_deployments() -> list:
    """One runner deployment per dataset, named after it, with its configured default parameters."""
    return [
        prepare.to_deployment(
            name=dataset,
            parameters=deployment_parameters(dataset),
            description=f"Normalise {RAW_DIRNAMES[dataset]} into versioned shards, embed with CLIP, verify, publish.",
            tags=["salmm", dataset],
        )
        for dataset in RAW_DIRNAMES
    ]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    serve(*build_deployments())


if __name__ == "__main__":
    main()
