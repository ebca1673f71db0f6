"""SalM² weights in the Hugging Face Hub's form: a folder, or a Hub model repository, holding
``model.safetensors`` (the trainable weights, official key names), ``config.json`` (what the
model was trained with) and a generated model card ``README.md``.

* :func:`resolve` - a checkpoint reference as every ``--checkpoint`` takes it: a checkpoint
  file (ours or the authors'), a folder in this form, or a Hub id ``owner/name[@revision]``
  (downloaded once into the Hugging Face cache: these three files only);
* :func:`read_pretrained` - the weights and config of such a folder, every key checked;
* :func:`write_pretrained` - write one (atomically, file by file; config.json last);
* :func:`pretrained_config` / :func:`model_card` - what goes into config.json and README.md;
* :func:`push_folder` - upload a folder to a Hub repository.

Loading never runs code from the download: the weights are read by safetensors (a JSON header
and raw tensors, no pickle), config.json as JSON checked field by field; nothing else in the
folder or repository is read.

``config.json``::

    format "salmm-hub", format_version 1, model "SalMM"
    size [height, width]     the frame size it was trained at
    clip {clip_model, clip_pretrained, profile}   the CLIP it was trained with
    trained_cached_clip      whether training read cached embeddings (None: official)
    source {kind ("salmm-train" | "official"), sha256 of the file it came from, epoch,
            valid_loss, git_commit}
    dataset, dataset_version  what it was trained on (None for an official release)
    metrics, metrics_from    {name: value} and what they score (the best validation epoch, or
                             the split and data version of a ``salmm evaluate`` summary)
    training                 the run's options (salmm train's config), or None
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from pipeline.core import network
from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder

__all__ = ["CONFIG", "HUB_ID", "WEIGHTS", "is_pretrained_folder", "model_card",
           "pretrained_config", "push_folder", "read_pretrained", "resolve", "weights_sha256",
           "write_pretrained"]

log = logging.getLogger(__name__)

FORMAT = "salmm-hub"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
FILES = (CONFIG, WEIGHTS, CARD)
"""The files a Hub folder holds; the only ones ever downloaded or read."""
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")
"""A Hub model id, optionally pinned: ``owner/name`` or ``owner/name@revision``."""
CLIP_KEYS = ("clip_model", "clip_pretrained", "profile")
FILE_SUFFIXES = (".pt", ".pth", ".tar", ".ckpt")
"""A missing reference with one of these suffixes is a missing file, never a Hub id."""


def is_pretrained_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding config.json and model.safetensors."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def download(repo_id: str, revision: str | None = None) -> str:
    """The local folder of Hub model ``repo_id`` at ``revision`` (default: main): its three
    files fetched into the Hugging Face cache (resumed where a download was cut; reused when
    there). ``HF_ENDPOINT`` and ``HF_HUB_CACHE`` are read at each call. BadInputError in one
    line when the Hub cannot be reached or has no such model."""
    from huggingface_hub import hf_hub_download  # lazy: only for Hub ids
    from huggingface_hub.errors import (  # lazy: as above
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    endpoint = network.hub_endpoint()
    offline = ("HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
               else network.unreachable(endpoint))      # seconds, not the client's retries
    folder = None
    for name in FILES:
        try:
            path = hf_hub_download(repo_id, name, revision=revision, etag_timeout=5,
                                   endpoint=endpoint, cache_dir=os.environ.get("HF_HUB_CACHE"),
                                   local_files_only=offline is not None)
        except LocalEntryNotFoundError:  # (a kind of EntryNotFoundError: first)
            if offline is not None and name == CARD and folder is not None:
                continue
            raise BadInputError(where, f"the Hub cannot be reached ({offline or 'no answer'})"
                                " and the model is not in the local cache; connect, or pass a"
                                " folder or file instead") from None
        except EntryNotFoundError:
            if name == CARD:
                continue
            raise BadInputError(where, f"the Hub repository has no {name}: not salmm weights"
                                " (save_pretrained / salmm export --hub-folder write it)"
                                ) from None
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise BadInputError(where, "no such model on the Hub (or it is private: log in"
                                " with `hf auth login`)") from None
        except (HfHubHTTPError, OSError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise BadInputError(where, f"download failed ({first})") from None
        folder = str(Path(path).parent)
    return folder


def resolve(ref: str) -> str:
    """What a ``--checkpoint`` names, as a local path: a checkpoint file as given, a Hub folder
    as given, or a Hub id's downloaded folder. BadInputError (one line) otherwise."""
    path = Path(ref)
    if path.is_file():
        return ref
    if path.is_dir():
        if not is_pretrained_folder(path):
            raise BadInputError(ref, f"a folder without {CONFIG} and {WEIGHTS}: not one"
                                " save_pretrained or `salmm export --hub-folder` wrote")
        return ref
    if HUB_ID.fullmatch(ref) and not path.parent.is_dir() and path.suffix not in FILE_SUFFIXES:
        repo_id, _, revision = ref.partition("@")
        return download(repo_id, revision or None)
    raise BadInputError(ref, "no such checkpoint: give a checkpoint file, a folder"
                        " save_pretrained wrote, or a Hub id owner/name[@revision]")


def _checked_config(path: str, config: Any) -> dict[str, Any]:
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise BadInputError(path, f"not a {FORMAT} config")
    if config.get("format_version") != FORMAT_VERSION:
        raise BadInputError(path, f"format version {config.get('format_version')!r}, this"
                            f" salmm reads {FORMAT_VERSION}")
    size, clip = config.get("size"), config.get("clip")
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and v > 0 and v % 32 == 0 for v in size)):
        raise BadInputError(path, "size must be [height, width], positive multiples of 32")
    if not (isinstance(clip, dict) and all(isinstance(clip.get(k), str | None) for k in CLIP_KEYS)
            and isinstance(clip.get("clip_model"), str) and isinstance(clip.get("profile"), str)):
        raise BadInputError(path, f"clip must name {', '.join(CLIP_KEYS)}")
    source = config.get("source")
    if not isinstance(source, dict) or source.get("kind") not in ("salmm-train", "official"):
        raise BadInputError(path, "source.kind must be salmm-train or official")
    return config


def weights_sha256(resolved: str) -> str:
    """The sha256 identifying a resolved checkpoint: the file's, or a Hub folder's weights'."""
    path = Path(resolved)
    file = path / WEIGHTS if path.is_dir() else path
    return Folder(str(file.parent)).sha256(file.name)


def read_pretrained(folder: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable weights (official key names, every key and shape checked against SalMM)
    and the config of a Hub folder. BadInputError (one line naming the file) for anything
    else: a config that is not ours, weights safetensors cannot read, a key too many or few."""
    from safetensors import SafetensorError  # lazy: only for Hub folders
    from safetensors.torch import load_file  # lazy: as above

    from salmm.model.checkpoint import check_state_dict  # lazy: checkpoint imports net
    from salmm.model.net import SalMM  # lazy: net's from_pretrained imports this module

    config_path, weights_path = str(Path(folder) / CONFIG), str(Path(folder) / WEIGHTS)
    try:
        config = json.loads(Path(config_path).read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise BadInputError(config_path, f"not readable JSON ({err})") from None
    config = _checked_config(config_path, config)
    try:
        weights = load_file(weights_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BadInputError(weights_path, f"not readable safetensors ({first})") from None
    check_state_dict(weights_path, weights, SalMM(backend="builtin").state_dict())
    return weights, config


def _number(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def pretrained_config(*, size: tuple[int, int], clip: dict[str, Any],
                      trained_cached_clip: bool | None, kind: str, sha256: str,
                      epoch: int | None, valid_loss: float | None, git_commit: str | None,
                      dataset: str | None, dataset_version: str | None,
                      metrics: dict[str, float] | None, training: dict[str, Any] | None,
                      metrics_from: str | None = None) -> dict[str, Any]:
    """The config.json of a Hub folder (see the module docstring)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": "SalMM",
        "size": [int(size[0]), int(size[1])],
        "clip": {k: clip.get(k) for k in CLIP_KEYS},
        "trained_cached_clip": trained_cached_clip,
        "source": {"kind": kind, "sha256": sha256, "epoch": _number(epoch),
                   "valid_loss": _number(valid_loss), "git_commit": git_commit},
        "dataset": dataset, "dataset_version": dataset_version,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()
                    if isinstance(v, int | float) and math.isfinite(v)},
        "metrics_from": metrics_from if metrics else None,
        "training": training,
    }


def model_card(config: dict[str, Any], repo_hint: str = "OWNER/NAME") -> str:
    """The README.md of a Hub folder: the front matter the Hub reads, then what the weights
    are, what they were trained on and with, their scores, and how to load them."""
    source, clip = config["source"], config["clip"]
    dataset = config.get("dataset") or "the authors' data"
    version = config.get("dataset_version")
    trained_on = (f"{dataset}, prepared data version `{version}` (`salmm data which` finds it)"
                  if version else f"{dataset} (an official release of the SalM² authors: no"
                  " salmm data version)")
    metrics = config.get("metrics") or {}
    table = (f"On {config.get('metrics_from')}:\n\n| " + " | ".join(metrics) + " |\n|"
             + " --- |" * len(metrics) + "\n| " + " | ".join(f"{v:.4f}" for v in metrics.values())
             + " |") if metrics else ("No scores recorded with these weights: run `salmm"
                                      " evaluate` on a prepared test split.")
    random_clip = clip.get("clip_pretrained") is None
    height, width = config["size"]
    tags = ["driver-attention", "saliency", "mamba", "salmm"] + (["random-clip"] if random_clip
                                                                 else [])
    warning = ("\n> **Trained with RANDOM CLIP weights** (a smoke run): these weights mean"
               " nothing.\n" if random_clip else "")
    training = config.get("training")
    options = (f"\n\nThe run's options:\n\n```json\n{json.dumps(training, indent=1)}\n```"
               if training else "")
    return f"""---
library_name: salmm
license: other
tags:
{chr(10).join(f"- {tag}" for tag in tags)}
---

# SalM² driver attention ({dataset})
{warning}
SalM² (AAAI 2025), a 76k-parameter saliency Mamba guided by a frozen CLIP embedding, in
[salmm](https://github.com/zhao-chunyu/SaliencyMamba)'s Hub form: `model.safetensors` (the
trainable weights, the published key names) and `config.json`.

- **Trained on**: {trained_on}
- **From**: a {source['kind']} checkpoint (sha256 `{str(source.get('sha256'))[:16]}…`, epoch
  {source.get('epoch')}, validation loss {source.get('valid_loss')}, commit
  {source.get('git_commit') or 'unknown'})
- **Input**: {width}x{height} RGB frames and the CLIP image embedding of the frame:
  {clip['clip_model']} with {clip.get('clip_pretrained') or 'random'} weights, profile
  `{clip['profile']}`
- **Terms**: the weights inherit the terms of the data they were trained on.

## Scores

{table}

## Use

```python
from salmm import SalMM
model = SalMM.from_pretrained("{repo_hint}")         # or a local folder
```

```bash
salmm evaluate --checkpoint {repo_hint} --prepared PREPARED --split test --out results
salmm stream --checkpoint {repo_hint} --input drive.mp4 --out overlay.mp4
```{options}
"""


def write_pretrained(folder: str | os.PathLike[str], state_dict: dict[str, torch.Tensor],
                     config: dict[str, Any], card: str) -> None:
    """Write a Hub folder: weights and card first, config.json last (its presence with the
    weights is what makes a folder one), each atomically."""
    from safetensors.torch import save as save_safetensors  # lazy: only for Hub folders

    target = Folder(str(folder))
    target.makedirs()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    target.write_bytes(WEIGHTS, save_safetensors(tensors, metadata={"format": "pt"}))
    target.write_bytes(CARD, card.encode())
    target.write_bytes(CONFIG, (json.dumps(config, indent=1, sort_keys=True) + "\n").encode())


def push_folder(folder: str, repo_id: str, *, private: bool = False, token: str | None = None,
                message: str = "salmm weights") -> str:
    """Upload a Hub folder's three files to model repository ``repo_id`` (created if need
    be); the commit's URL."""
    from huggingface_hub import HfApi  # lazy: only when pushing

    if not is_pretrained_folder(folder):
        raise BadInputError(folder, f"not a Hub folder (no {CONFIG} and {WEIGHTS})")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=list(FILES),
                             commit_message=message)
    return str(getattr(info, "commit_url", info))
