"""The frozen CLIP image encoder of SalM²: the one home of everything CLIP.

* :class:`ClipSpec` - which encoder (open_clip model name, weights, preprocessing profile), and
  :meth:`ClipSpec.identity`, how caches and checkpoints record it; :func:`parse_weights` is the
  one parser of the weights option (``none`` = random weights). They live in
  :mod:`pipeline.encoders.clip_spec`, which imports neither torch nor open_clip.
* :func:`build_clip_encoder` - the one builder (a frozen :class:`ClipEncoder`); it finds out in
  a few seconds when weights it would have to download cannot be reached, and then raises one
  :class:`~pipeline.core.errors.BadInputError` line saying what to do, instead of letting the hub
  client retry for a minute. :func:`cached_encoder` builds each spec once per process.
* :func:`embed_pairs` - the cache's numbers: each frame and its mirror image, computed in fixed
  micro-batches with a fixed intra-op thread count, so a sample's embedding does not depend on
  the batch it falls in, the thread count, the number of worker processes or a resume.

Profiles (input: float RGB frames [B, 3, H, W] in [0, 1]):

* ``"salmm"`` - the published SalM² preprocessing: ``torchvision`` resize to 224 x 224
  (bilinear, antialias on), **no** CLIP mean/std normalisation (the authors fed the [0, 1]
  frame straight into ``encode_image``).
* ``"openclip"`` - the model's own normalisation: resize to its image size with its
  interpolation (antialias on; the frame is squashed to a square, not centre-cropped), then
  its mean/std.

The published backbone is ViT-B/32 (the authors' README corrects the paper's "RN50x16"),
open_clip name ``"ViT-B-32"`` with ``pretrained="openai"``. Output: [B, 512] float32, the raw
(un-normalised) image embedding.

Activation: OpenAI's CLIP (the authors' ``clip.load("ViT-B/32")``) computes its MLPs with
QuickGELU, ``x * sigmoid(1.702 x)``; open_clip builds ``"ViT-B-32"`` with ``nn.GELU`` whatever
weights it loads. :func:`activation` decides which one an encoder uses - QuickGELU for weights
trained with it (the ``openai`` tag and any tag whose config says so), for a local weight file
or random weights of the published model (the authors' architecture), and for models whose own
config says so; every other model keeps its configuration - and the choice is part of the
encoder's identity, so caches, checkpoints and exports made with the other one are refused.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import torch
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from pipeline.core import network
from pipeline.core.cpu import intra_op_threads
from pipeline.core.errors import BadInputError
from pipeline.encoders.clip_spec import (  # the encoder's face: its spec names too
    DEFAULT_MODEL,
    DEFAULT_PROFILE,
    DEFAULT_WEIGHTS,
    PRECISION_NAMES,
    PROFILES,
    PUBLISHED,
    RANDOM_NOTE,
    RANDOM_WARNING,
    ClipSpec,
    activation,
    parse_weights,
    random_weights,
    weights_identity,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PROFILE",
    "DEFAULT_WEIGHTS",
    "PRECISIONS",
    "PROFILES",
    "PUBLISHED",
    "RANDOM_NOTE",
    "ClipEncoder",
    "ClipSpec",
    "activation",
    "build_clip_encoder",
    "cached_encoder",
    "check_weights",
    "embed_pairs",
    "parse_weights",
    "random_weights",
    "round_like_openai",
    "weights_identity",
]

log = logging.getLogger(__name__)

PRECISIONS = dict(zip(PRECISION_NAMES, (None, torch.bfloat16, torch.float16)))
"""Autocast dtype of the encoder on CUDA (CPU always computes in float32)."""
SALMM_SIZE = (224, 224)
MICRO_BATCH = {"cpu": 8, "cuda": 64}
"""Samples (each with its mirror image: twice as many images) per encoder call of
:func:`embed_pairs`, per device type; the last call of a run of samples is padded."""
CACHE_THREADS = 1
"""Intra-op threads of the encoder in :func:`embed_pairs` on CPU (parallelism comes from worker
processes): one thread makes torch's matrix products independent of the machine's core count."""


class ClipEncoder(nn.Module):
    """Frozen, always-eval CLIP image tower plus one preprocessing profile.

    visual: open_clip's image tower; size: (h, w) it is fed; interpolation: resize mode;
    mean, std: per-channel normalisation or None; identity: what produced the embeddings.
    """

    def __init__(self, visual, size, interpolation, mean, std, identity: dict):
        super().__init__()
        self.visual = visual
        self.size = tuple(size)
        self.interpolation = interpolation
        self.identity = dict(identity)
        if mean is None:
            self.mean = self.std = None
        else:
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ClipEncoder:
        """Stays in eval mode whatever the parent does (frozen encoder)."""
        return super().train(False)

    def preprocess(self, frames: Tensor) -> Tensor:
        """frames [B, 3, H, W] float in [0, 1] -> the encoder's input [B, 3, h, w]."""
        if frames.ndim != 4 or frames.shape[1] != 3 or not frames.is_floating_point():
            raise ValueError(
                f"CLIP encoder expects float frames [B, 3, H, W], got {tuple(frames.shape)} "
                f"{frames.dtype}"
            )
        if frames.numel() and (frames.min() < 0 or frames.max() > 1):
            raise ValueError("CLIP encoder expects frames scaled to [0, 1]")
        x = TF.resize(frames.float(), list(self.size), self.interpolation, antialias=True)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        """frames [B, 3, H, W] in [0, 1] -> image embedding [B, 512] float32."""
        return self.visual(self.preprocess(frames)).float()


# ---- weights ------------------------------------------------------------------------------------


def _hub_filenames() -> tuple[str, ...]:
    pretrained = open_clip.pretrained
    return (getattr(pretrained, "HF_SAFE_WEIGHTS_NAME", "open_clip_model.safetensors"),
            getattr(pretrained, "HF_WEIGHTS_NAME", "open_clip_pytorch_model.bin"))


def _cached_weights(cfg: dict) -> bool:
    """Whether open_clip would find the weights of ``cfg`` (its pretrained config) on disk."""
    hub = cfg.get("hf_hub", "")
    if hub and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import try_to_load_from_cache  # lazy: open_clip runs without it

        repo, filename = os.path.split(hub)
        names = (filename,) if filename else _hub_filenames()
        return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)
    url = cfg.get("url", "")
    return bool(url) and (Path("~/.cache/clip").expanduser() / os.path.basename(url)).is_file()


def _weights_url(cfg: dict) -> str:
    """Where open_clip would download ``cfg``'s weights from: the Hugging Face endpoint for
    hub weights, else the URL."""
    if cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return cfg.get("url", "")


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make the Hugging Face client use its local cache only (no HEAD requests, no retries)."""
    try:
        from huggingface_hub import constants  # lazy: open_clip runs without it
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


OPTION = "--clip-pretrained {}"
"""How a command line spells the weights option (a flow run: ``--param clip_pretrained={}``)."""


def _weights_unavailable(spec: ClipSpec, reason: str, option: str = OPTION) -> BadInputError:
    return BadInputError(spec.pretrained, f"could not get the {spec.model} weights ({reason});"
                         f" without a network pass {option.format('/path/to/weights.pt')} (a"
                         " local open_clip/OpenAI checkpoint) or"
                         f" {option.format('none')} (random weights)")


def check_weights(spec: ClipSpec, option: str = OPTION) -> bool:
    """Whether ``spec``'s weights must be downloaded and are not on disk (False: random, a
    local file, a tag open_clip ships, or found in the local cache). BadInputError (one line;
    the hint spells the option as ``option``) when they would have to be downloaded and their
    host does not answer within :data:`pipeline.core.network.PROBE_TIMEOUT_S`: found out
    before any work."""
    if spec.pretrained is None or Path(spec.pretrained).exists():
        return False
    hub = spec.pretrained.startswith("hf-hub:")
    cfg = ({"hf_hub": spec.pretrained.removeprefix("hf-hub:") + "/"} if hub
           else open_clip.get_pretrained_cfg(spec.model, spec.pretrained))
    if not cfg or "file" in cfg or _cached_weights(cfg):
        return False
    if (why := network.reachable(*network.host_of(_weights_url(cfg)))) is not None:
        raise _weights_unavailable(spec, why, option)
    return True


_OPEN_CLIP_RANDOM_NOTE = "No pretrained weights loaded"
"""How open_clip's own warning about random weights starts (:data:`RANDOM_WARNING` says it)."""


@contextlib.contextmanager
def _without(prefix: str) -> Iterator[None]:
    """Drop the root logger's messages that start with ``prefix`` (open_clip logs there)."""
    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith(prefix)
    drop = Drop()
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


def _create(spec: ClipSpec, seed: int) -> nn.Module:
    """open_clip's model for ``spec``; weights that would be downloaded are looked for on disk
    first and their host probed once when they are not there."""
    hub = spec.pretrained is not None and spec.pretrained.startswith("hf-hub:")
    name, tag = (spec.pretrained, None) if hub else (spec.model, spec.pretrained)
    quick = {"force_quick_gelu": spec.activation == "quickgelu"}
    if spec.pretrained is None:
        log.info("CLIP %s: no pretrained weights, random initialisation (seed %d)", name, seed)
        with torch.random.fork_rng(devices=[]), _without(_OPEN_CLIP_RANDOM_NOTE):
            torch.manual_seed(seed)
            model, _, _ = open_clip.create_model_and_transforms(name, pretrained=None, **quick)
        return model
    download = check_weights(spec)
    local = Path(spec.pretrained).exists()
    offline = _hub_offline() if not download and not local else contextlib.nullcontext()
    log.info("CLIP %s: loading weights %s", name, spec.pretrained)
    try:
        with offline:
            model, _, _ = open_clip.create_model_and_transforms(name, pretrained=tag, **quick)
    except (OSError, RuntimeError) as err:
        if Path(spec.pretrained).exists():
            raise BadInputError(spec.pretrained, f"not a {spec.model} weight file"
                                f" ({_first_line(err)})") from None
        raise _weights_unavailable(spec, _first_line(err)) from None
    if openai_weights(spec):
        round_like_openai(model.visual)
    return model


def openai_weights(spec: ClipSpec) -> bool:
    """Whether ``spec``'s weights are OpenAI's as the authors load them: the ``openai`` tag, or a
    local weight file of the published model (OpenAI's release or a copy of it)."""
    return spec.pretrained == "openai" or (spec.model == DEFAULT_MODEL and spec.pretrained
                                           is not None and Path(spec.pretrained).is_file())


def round_like_openai(visual: nn.Module) -> int:
    """Round the image tower's weights to float16 in place, as OpenAI's ``clip.load`` does
    (``convert_weights``, then ``.float()`` on CPU): convolution, linear and attention
    projection weights and biases and the output projection ``proj``; layer norms and the
    class and position embeddings keep float32. OpenAI's release stores exactly these in
    float16, so its own file is unchanged; a float32 copy is rounded as the authors' loader
    rounds it. Returns the number of tensors rounded."""
    tensors = []
    for module in visual.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            tensors += [module.weight, module.bias]
        elif isinstance(module, nn.MultiheadAttention):
            tensors += [getattr(module, name) for name in (
                "in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
                "v_proj_weight", "bias_k", "bias_v")]
    tensors.append(getattr(visual, "proj", None))
    done = 0
    with torch.no_grad():
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                tensor.copy_(tensor.half().float())
                done += 1
    return done


def built_activation(visual: nn.Module) -> str:
    """The activation the image tower's MLPs were built with: "quickgelu" or "gelu" (or the
    class name of another one)."""
    kinds = {type(m).__name__ for m in visual.modules()
             if type(m).__name__ in ("QuickGELU", "GELU")}
    if kinds == {"QuickGELU"}:
        return "quickgelu"
    if kinds == {"GELU"}:
        return "gelu"
    return "+".join(sorted(kinds)) or "none"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def build_clip_encoder(
    model_name: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_WEIGHTS,
    profile: str = DEFAULT_PROFILE,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> ClipEncoder:
    """The frozen encoder of ``ClipSpec(model_name, pretrained, profile)`` on ``device``.

    pretrained: an open_clip tag (``"openai"``), a local weight file, ``"hf-hub:org/repo"``
    (replaces model_name), or None for random weights drawn from ``seed`` (tests and smoke
    runs; logged as a warning). The MLP activation is :func:`activation`'s choice; OpenAI's
    weights are rounded as OpenAI's loader rounds them (:func:`round_like_openai`). ``identity``
    of the result: {"model", "weights" (see :func:`weights_identity`), "profile",
    "activation", "open_clip" (version), "embed_dim"}.

    Raises:
        ValueError: unknown profile, or a model the salmm profile cannot feed.
        BadInputError: the weights cannot be had (one line saying what to do), found out in
            at most a few seconds when they would have to be downloaded.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    spec = ClipSpec(model_name, pretrained, profile)
    model = _create(spec, seed)
    name = pretrained if pretrained is not None and pretrained.startswith("hf-hub:") \
        else model_name
    cfg = open_clip.get_model_preprocess_cfg(model)
    model_size = (
        tuple(cfg["size"]) if isinstance(cfg["size"], (tuple, list)) else (cfg["size"],) * 2
    )
    if profile == "salmm":
        if model_size != SALMM_SIZE:
            raise ValueError(f"profile 'salmm' feeds 224x224 frames; {name} expects {model_size}")
        size, interpolation, mean, std = SALMM_SIZE, InterpolationMode.BILINEAR, None, None
    else:
        size, mean, std = model_size, cfg["mean"], cfg["std"]
        interpolation = InterpolationMode(cfg.get("interpolation", "bicubic"))
    built = built_activation(model.visual)
    if spec.activation != "hub-config" and built != spec.activation:
        raise ValueError(f"CLIP {name}: built with {built}, {spec.activation} was asked for")
    identity = {
        "model": name,
        "weights": weights_identity(pretrained, seed),
        "profile": profile,
        "activation": spec.activation,
        "open_clip": open_clip.__version__,
        "embed_dim": int(model.visual.output_dim),
    }
    encoder = ClipEncoder(model.visual, size, interpolation, mean, std, identity).to(device)
    log.info("CLIP encoder %s, weights %s, profile %s, device %s", name, identity["weights"],
             profile, device)
    if random_weights(identity["weights"]):
        log.warning("%s", RANDOM_WARNING)
    return encoder


@functools.lru_cache(maxsize=2)
def cached_encoder(spec: ClipSpec, device: str = "cpu") -> ClipEncoder:
    """:func:`build_clip_encoder` of ``spec`` on ``device``, once per process (Dask workers
    and repeated evaluations reuse it)."""
    return build_clip_encoder(spec.model, spec.pretrained, spec.profile, device)


# ---- the cache's numbers ------------------------------------------------------------------------


def embed_pairs(encoder: ClipEncoder, frames: Tensor, precision: str = "fp32") -> np.ndarray:
    """uint8 frames [b, H, W, 3] -> float32 [b, 2, D]: the embedding of each frame (as float in
    [0, 1], exactly what the trainer feeds the model) and of its horizontal flip.

    The encoder runs on the device it lives on, in micro-batches of exactly
    ``MICRO_BATCH[device type]`` frames and their flips (the last one padded with black
    frames), under ``torch.inference_mode`` and, on CUDA, autocast ``precision``; on CPU with
    :data:`CACHE_THREADS` intra-op thread. Every call then has the same shapes and the same
    thread count, so a frame's numbers depend only on the frame, the weights and the software
    (callers keep micro-batches aligned, e.g. to cache chunks).
    """
    device = next(encoder.parameters()).device
    micro = MICRO_BATCH.get(device.type, MICRO_BATCH["cuda"])
    autocast = PRECISIONS[precision] if device.type == "cuda" else None
    b = frames.shape[0]
    out = np.empty((b, 2, encoder.identity["embed_dim"]), dtype=np.float32)
    threads = intra_op_threads(CACHE_THREADS) if device.type == "cpu" else \
        contextlib.nullcontext()
    with threads, torch.inference_mode(), torch.autocast(
            device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        for start in range(0, b, micro):
            part = frames[start:start + micro].to(device, non_blocking=True)
            n = part.shape[0]
            if n < micro:
                part = torch.cat([part, part.new_zeros(micro - n, *part.shape[1:])])
            x = part.permute(0, 3, 1, 2).float().div_(255)
            x = torch.cat([x, x.flip(-1)])                           # [2m, 3, H, W]
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            emb = encoder.encode(x).float().cpu().numpy()            # [2m, D]
            out[start:start + n, 0] = emb[:n]
            out[start:start + n, 1] = emb[micro:micro + n]
    return out
