"""Default parameters of the ``prepare/<dataset>`` deployments, from configuration set once.

Sources, later ones winning:

1. built-in defaults (raw data under ``data/raw/<Dataset>``, prepared data under ``data/prepared/<dataset>``,
   relative to the folder the deployments are served from,
   CLIP ViT-B-32 with the ``openai`` weights and the ``salmm`` profile, CPU, a local Dask cluster);
2. a TOML file: ``$SALMM_CONFIG`` if set, else ``.salmm/flows.toml`` if it exists. Top-level keys set
   every deployment, a ``[<dataset>]`` table (e.g. ``[bdda]``) sets one::

       data_root = "/data/gaze"          # raw roots become /data/gaze/BDDA, /data/gaze/TrafficGaze, ...
       prepared_root = "/data/prepared"
       clip_pretrained = "/models/ViT-B-32-openai.pt"
       dask_address = "tcp://scheduler:8786"

       [bdda]
       root = "/mnt/bdda"                # overrides data_root for this dataset only

       [dreyeve]
       ground_truth = "saliency"         # its saliency maps instead of saliency_fix

3. environment variables: ``SALMM_DATA_ROOT``, ``SALMM_PREPARED_ROOT``, ``SALMM_CLIP_PRETRAINED``,
   ``SALMM_DEVICE``, ``SALMM_DASK_ADDRESS``.

Any parameter can still be overridden per run: ``prefect deployment run prepare/bdda --param root=/data/BDDA``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pipeline.core.errors import BadInputError
from pipeline.datasets import REGISTRY
from pipeline.encoders.clip import DEFAULT_MODEL, DEFAULT_PROFILE, DEFAULT_WEIGHTS

# Folder names of the raw downloads under a common data root, as the authors' release names them.
RAW_DIRNAMES = {name: entry.release_dir for name, entry in REGISTRY.items()}
DEPLOYMENT_NAMES = [f"prepare/{dataset}" for dataset in RAW_DIRNAMES]
"""The deployments ``python -m flows.serve`` serves, one per dataset."""

DEFAULTS: dict[str, Any] = {
    "data_root": "data/raw",
    "prepared_root": "data/prepared",
    "size": "256x256",
    "decode": "faithful",
    "frame_codec": "png",
    "clip_model": DEFAULT_MODEL,
    "clip_pretrained": DEFAULT_WEIGHTS,
    "profile": DEFAULT_PROFILE,
    "device": "cpu",
    "dask_address": None,
    "workers": None,
    "skip_bad": False,
    "max_bad_fraction": 0.01,
    "ground_truth": None,       # DR(eye)VE: [dreyeve] ground_truth = "saliency" for the other maps
}

ENV_KEYS = {
    "SALMM_DATA_ROOT": "data_root",
    "SALMM_PREPARED_ROOT": "prepared_root",
    "SALMM_CLIP_PRETRAINED": "clip_pretrained",
    "SALMM_DEVICE": "device",
    "SALMM_DASK_ADDRESS": "dask_address",
}


def config_file() -> Path | None:
    """The TOML file in effect: ``$SALMM_CONFIG``, else ``.salmm/flows.toml`` when present."""
    if os.environ.get("SALMM_CONFIG"):
        return Path(os.environ["SALMM_CONFIG"])
    local = Path(".salmm") / "flows.toml"
    return local if local.exists() else None


def deployment_parameters(dataset: str) -> dict[str, Any]:
    """The default flow parameters of deployment ``prepare/<dataset>``.

    Raises:
        BadInputError: the configuration file is missing, not TOML, or names an unknown key.
    """
    settings = dict(DEFAULTS)
    path = config_file()
    if path is not None:
        try:
            table = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise BadInputError(path, f"cannot read the flows configuration: {err}") from err
        per_dataset = table.pop(dataset, {})
        for name in RAW_DIRNAMES:
            table.pop(name, None)
        known = set(DEFAULTS) | {"root", "out"}
        unknown = sorted((set(table) | set(per_dataset)) - known)
        if unknown:
            raise BadInputError(
                path, f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        settings.update(table)
        settings.update(per_dataset)
    for env_key, name in ENV_KEYS.items():
        if os.environ.get(env_key):
            settings[name] = os.environ[env_key]
    params = {
        "dataset": dataset,
        "root": _absolute(
            settings.pop("root", None) or Path(settings["data_root"]) / RAW_DIRNAMES[dataset]
        ),
        "out": _absolute(settings.pop("out", None) or Path(settings["prepared_root"]) / dataset),
    }
    settings.pop("data_root")
    settings.pop("prepared_root")
    params.update(settings)
    return params


def _absolute(location: str | Path) -> str:
    """Local paths made absolute (relative ones are relative to where the deployments are served);
    fsspec URLs (``s3://...``) unchanged."""
    location = str(location)
    return location if "://" in location else str(Path(location).expanduser().resolve())
