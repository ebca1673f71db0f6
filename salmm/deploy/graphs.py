"""``python -m salmm.export``: a checkpoint as two ONNX graphs a deployment can ship.

``python -m salmm.export --checkpoint CKPT --out DIR [--opset 17] [--size 256x256]`` writes

* ``salmm.onnx`` - the SalM² network: inputs ``frame`` float32 [B, 3, H, W] in [0, 1] and
  ``embedding`` float32 [B, 512]; output ``saliency`` float32 [B, 1, H, W] in (0, 1);
* ``clip.onnx`` - the frozen CLIP image encoder with the checkpoint's preprocessing inside it:
  input ``frame`` float32 [B, 3, H, W] in [0, 1] (the same frame), output ``embedding`` float32
  [B, 512]. The ``salmm`` profile's antialiased bilinear resize to 224x224 (which ONNX's Resize
  cannot do) is two matrix products with torchvision's own resize operators for H x W;
* ``export.json`` - what they are: inputs, outputs, shapes, value ranges, the frame size, the
  opset, the checkpoint (path, sha256, kind, epoch) and the CLIP encoder's identity, the
  software, and what the checks at export measured (below).

B is free; H and W are fixed at export (``--size``, default the checkpoint's training size),
because the selective scan's shape follows the frame size. The network is traced with Mamba's
``export`` backend (:func:`salmm.model.scan.selective_scan_export`: plain tensor operations; the
numba kernels of the CPU scan would be traced into constants), and each graph is checked
against PyTorch on two different random inputs, so a graph with a frozen scan cannot pass:
the network traced in float64 under ONNX's reference evaluator must equal PyTorch in float64
(to :data:`GRAPH_TOLERANCE`; float32 rounding is amplified by the published network's narrow
LayerNorms, so float32 cannot tell a wrong graph from rounding), and the float32 graphs are
measured under onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import scipy.special
import torch
from torch import Tensor, nn
from torchvision.transforms import functional as TF

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.core.progress import progress
from pipeline.encoders.clip import ClipEncoder, cached_encoder
from salmm.data.sources import (
    folder_images,
    image_items,
    network_input,
    open_video,
    video_items,
)
from salmm.deploy.options import (
    DEFAULT_OPSET,
    EXPORT_BACKEND,
    INT8_COSINE,
    INT8_FRAMES,
    ExportOptions,
)
from salmm.model.loading import LoadedModel, load_model
from salmm.model.net import SalMM

log = logging.getLogger("salmm.export")

GRAPH_TOLERANCE = 1e-6
"""Largest difference from PyTorch the network's float64 graph may show (max abs on [0, 1]
maps; measured: 1e-10). A graph off by more computes something else."""
CLIP_TOLERANCE = 1e-3
"""Largest difference from PyTorch the CLIP graph's float32 embedding may show, relative to
the embedding's largest entry (measured: about 1e-5)."""
FORMAT = "salmm-onnx"
FORMAT_VERSION = 2
"""2: the CLIP graph records its MLP activation (QuickGELU for the published CLIP)."""
GRAPHS = ("salmm", "clip")
INT8_GRAPH = "clip-int8"
"""The optional int8 CLIP graph (``export --clip-int8``)."""


class ClipGraph(nn.Module):
    """The encoder as it is exported: ``frames [B, 3, H, W] -> embedding [B, D]`` with the
    resize to the encoder's input size as ``R_rows @ frame @ R_cols`` (torchvision's resize
    applied to identity matrices, so the same operator), then the profile's normalisation."""

    def __init__(self, encoder: ClipEncoder, size: tuple[int, int]) -> None:
        super().__init__()
        self.visual = encoder.visual
        height, width = size
        rows = TF.resize(torch.eye(height)[None, None], [encoder.size[0], height],
                         encoder.interpolation, antialias=True)[0, 0]        # [h, H]
        cols = TF.resize(torch.eye(width)[None, None], [width, encoder.size[1]],
                         encoder.interpolation, antialias=True)[0, 0]        # [W, w]
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)
        self.mean, self.std = encoder.mean, encoder.std

    def forward(self, frames: Tensor) -> Tensor:
        x = self.rows @ frames @ self.cols
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return self.visual(x).float()


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str],
            outputs: list[str], opset: int) -> None:
    axes = {name: {0: "batch"} for name in inputs + outputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # the tracer's notes on shape arithmetic
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)


def largest_difference(path: Path, module: Any, make_inputs: Any) -> float:
    """Max abs difference between ``module`` and the graph at ``path`` (onnxruntime, CPU) over
    two different random inputs (``make_inputs(batch, seed)``), at batch 1 and at batch 4."""
    import onnxruntime  # lazy: the deploy extra, needed to check (and run) exports

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return _worst(lambda feeds: session.run(None, feeds)[0],
                  [i.name for i in session.get_inputs()], module, make_inputs)


def _worst(run: Any, names: list[str], module: Any, make_inputs: Any) -> float:
    """Max abs of ``run(feeds) - module(*inputs)`` over the :data:`CHECKS` inputs."""
    worst = 0.0
    for seed, batch in CHECKS:
        inputs = make_inputs(batch, seed)
        with torch.inference_mode():
            want = module(*inputs).numpy()
        got = run(dict(zip(names, (t.numpy() for t in inputs))))
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


CHECKS = ((1, 1), (2, 4))
"""(seed, batch) of the random inputs every graph is checked on: two different inputs, so a
graph that traced part of the computation into constants cannot match both."""


def reference_difference(path: Path, module: nn.Module, make_inputs: Any) -> float:
    """:func:`largest_difference` with ONNX's own reference evaluator (``onnx.reference``, plain
    numpy, any dtype) in place of onnxruntime - the way to run a float64 graph."""
    from onnx.reference import ReferenceEvaluator  # lazy: the deploy extra
    from onnx.reference.op_run import OpRun  # lazy: the deploy extra

    class Erf(OpRun):              # the reference's own Erf rounds through float32
        op_domain = ""

        def _run(self, x: np.ndarray) -> tuple[np.ndarray]:
            return (scipy.special.erf(x).astype(x.dtype, copy=False),)

    evaluator = ReferenceEvaluator(str(path), new_ops=[Erf])
    return _worst(lambda feeds: evaluator.run(None, feeds)[0], evaluator.input_names, module,
                  make_inputs)


def op_types(path: Path) -> list[str]:
    """The graph's operators in order, casts left out (what a dtype changes)."""
    import onnx  # lazy: the deploy extra

    return [node.op_type for node in onnx.load(str(path)).graph.node if node.op_type != "Cast"]


def random_frames(size: tuple[int, int], dtype: torch.dtype = torch.float32) -> Any:
    """``(batch, seed) -> frames`` [batch, 3, H, W] in [0, 1], seeded."""
    def make(batch: int, seed: int) -> Tensor:
        return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed),
                          dtype=dtype)
    return make


def network_inputs(size: tuple[int, int], dim: int, dtype: torch.dtype = torch.float32) -> Any:
    """``(batch, seed) -> (frames, embeddings)``: random frames and embeddings of norm ~200 (a
    CLIP ViT-B-32 image embedding's is 10-12; larger makes the embedding path matter more)."""
    frames = random_frames(size, dtype)

    def make(batch: int, seed: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(seed + 100)
        return frames(batch, seed), torch.randn(batch, dim, generator=gen, dtype=dtype) * 10
    return make


def export_network(state_dict: dict[str, Tensor], size: tuple[int, int], path: Path,
                   opset: int = DEFAULT_OPSET, dim: int = 512, *,
                   backend: str = EXPORT_BACKEND) -> dict[str, float]:
    """Write the SalMM network with weights ``state_dict`` for frames of ``size`` (height,
    width) as a float32 ONNX graph at ``path`` (traced with Mamba's ``backend``); returns what
    the checks measured (max abs, on :data:`CHECKS` inputs from :func:`network_inputs`):

    * ``graph`` - the same network traced in float64, run by ONNX's reference evaluator,
      against eager PyTorch in float64: whether the graph computes the network (a frozen or
      mistranslated scan shows at 1e-2, rounding at 1e-10); its operators must be the float32
      graph's;
    * ``onnxruntime`` - the float32 graph under onnxruntime against eager PyTorch in float32;
    * ``pytorch_float32`` - eager PyTorch float32 against float64: how much float32 rounding
      alone moves these maps. The published network's two- and four-channel LayerNorms
      amplify rounding, so ``onnxruntime`` can exceed 1e-4 on the same scale as
      this figure while ``graph`` shows the computation is exact (README, "Real time").
    """
    network = SalMM(backend=backend).eval()
    network.load_state_dict(state_dict)
    reference = SalMM(backend="builtin").eval()
    reference.load_state_dict(state_dict)
    inputs32 = network_inputs(size, dim)
    _export(network, inputs32(1, 0), path, ["frame", "embedding"], ["saliency"], opset)
    checks = {"onnxruntime": largest_difference(path, reference, inputs32)}
    inputs64 = network_inputs(size, dim, torch.float64)
    with torch.inference_mode():            # PyTorch float32 on the float64 check's inputs
        rounded = [reference(*(t.float() for t in inputs64(batch, seed))).double()
                   for seed, batch in CHECKS]
    network.double()
    reference.double()
    with tempfile.TemporaryDirectory() as tmp:
        path64 = Path(tmp) / "salmm64.onnx"
        _export(network, inputs64(1, 0), path64, ["frame", "embedding"], ["saliency"], opset)
        if op_types(path64) != op_types(path):
            raise RuntimeError("the float64 trace of the network has other operators than the"
                               " float32 one")
        checks["graph"] = reference_difference(path64, reference, inputs64)
    with torch.inference_mode():
        checks["pytorch_float32"] = max(
            float((r - reference(*inputs64(batch, seed))).abs().max())
            for r, (seed, batch) in zip(rounded, CHECKS))
    return checks


def export_clip(encoder: ClipEncoder, size: tuple[int, int], path: Path,
                opset: int = DEFAULT_OPSET) -> float:
    """Write ``encoder`` with its preprocessing (:class:`ClipGraph`) for frames of ``size`` as
    ONNX at ``path``; returns its largest difference from ``encoder.encode`` relative to the
    largest embedding entry (onnxruntime, :data:`CHECKS` inputs)."""
    frames = random_frames(size)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)   # its fused attention has no ONNX form
    try:
        _export(ClipGraph(encoder, size).eval(), (frames(1, 0),), path, ["frame"],
                ["embedding"], opset)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    with torch.inference_mode():
        scale = float(encoder.encode(frames(1, 1)).abs().max())
    return largest_difference(path, encoder.encode, lambda b, s: (frames(b, s),)) / scale


def user_frames(spec: str, size: tuple[int, int], limit: int = INT8_FRAMES) -> list[np.ndarray]:
    """Up to ``limit`` frames of a video or a folder of images, spread over it, as the graphs
    take them (float32 [1, 3, H, W] in [0, 1]); BadInputError (one line) when there are none."""
    path = Path(spec)
    if path.is_dir():
        files = folder_images(spec)
        step = max(1, len(files) // limit)
        items = image_items(files[::step][:limit], size)
    elif path.is_file():
        capture, _, total = open_video(spec)
        step = max(1, (total or limit) // limit)
        items = (item for number, item in enumerate(
            video_items(spec, capture, size, total, allow_short=True)) if number % step == 0)
    else:
        raise BadInputError(spec, "no such video or folder (--clip-int8 takes your frames)")
    frames = [item.model_input for _, item in zip(range(limit), items)]
    if not frames:
        raise BadInputError(spec, "no frames to measure int8 CLIP on")
    return [network_input(frame) for frame in frames]


def quantize_clip(float32: Path, int8: Path, frames: list[np.ndarray]) -> dict[str, float]:
    """Write ``float32`` (a CLIP graph) with int8 weights at ``int8`` (onnxruntime's dynamic
    quantisation: weights int8 per tensor, activations quantised per call); returns the
    cosine of its embeddings to the float32 graph's on ``frames``: worst, mean, and how many."""
    import onnxruntime  # lazy: the deploy extra
    from onnxruntime.quantization import QuantType, quantize_dynamic  # lazy: likewise

    logging.disable(logging.WARNING)  # its advice to pre-process, on the root logger
    try:
        quantize_dynamic(str(float32), str(int8), weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    runs = [onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for path in (float32, int8)]
    cosines = []
    for frame in frames:
        a, b = (run.run(None, {"frame": frame})[0][0].astype(np.float64) for run in runs)
        cosines.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300)))
    return {"cosine_min": min(cosines), "cosine_mean": float(np.mean(cosines)),
            "frames": len(cosines)}


def export(opts: ExportOptions) -> dict[str, Any]:
    """Write the two graphs and ``export.json`` into ``opts.out``; returns the description.

    Both graphs are checked before anything is written (BadInputError, and nothing in
    ``opts.out``, when the network's float64 graph is more than :data:`GRAPH_TOLERANCE` from
    PyTorch or the CLIP graph more than :data:`CLIP_TOLERANCE`; see :func:`export_network`
    and :func:`export_clip`); the graphs
    are written first and ``export.json`` last, each atomically, so a folder with an
    ``export.json`` holds a whole export."""
    loaded = load_model(opts.checkpoint, inline_clip=False, given_clip=dict(opts.clip),
                        device="cpu")
    size = opts.size or loaded.size
    if size[0] % 32 or size[1] % 32:
        raise BadInputError(opts.checkpoint, f"frames of {size[1]}x{size[0]}: SalMM needs width"
                            " and height that are multiples of 32 (see --size)")
    encoder = cached_encoder(loaded.clip, "cpu")
    dim = encoder.identity["embed_dim"]
    checks = {}
    with tempfile.TemporaryDirectory() as tmp, \
            progress(total=len(GRAPHS), unit="graph", desc="export (trace and check)") as bar:
        paths = {name: Path(tmp) / f"{name}.onnx" for name in GRAPHS}
        log.info("exporting SalM2 and CLIP for %dx%d frames (opset %d); each graph is traced"
                 " and checked against PyTorch (minutes on a CPU)", size[1], size[0], opts.opset)
        checks["salmm"] = export_network(loaded.model.state_dict(), size, paths["salmm"],
                                         opts.opset, dim, backend=opts.backend)
        bar.update(1)
        if checks["salmm"]["graph"] > GRAPH_TOLERANCE:
            raise BadInputError(opts.checkpoint, f"the exported network computes something else:"
                                f" {checks['salmm']['graph']:.2e} from PyTorch in float64 (more"
                                f" than {GRAPH_TOLERANCE:g}); not exported")
        checks["clip"] = export_clip(encoder, size, paths["clip"], opts.opset)
        bar.update(1)
        if checks["clip"] > CLIP_TOLERANCE:
            raise BadInputError(opts.checkpoint, f"the exported CLIP encoder differs from"
                                f" PyTorch by {checks['clip']:.2e} of its largest entry (more"
                                f" than {CLIP_TOLERANCE:g}); not exported")
        if opts.clip_int8 is not None:
            frames = user_frames(opts.clip_int8, size)
            log.info("quantising CLIP to int8 and measuring it on %d of your frames", len(frames))
            paths[INT8_GRAPH] = Path(tmp) / f"{INT8_GRAPH}.onnx"
            checks[INT8_GRAPH] = {**quantize_clip(paths["clip"], paths[INT8_GRAPH], frames),
                                  "source": str(opts.clip_int8)}
            if checks[INT8_GRAPH]["cosine_min"] < INT8_COSINE:
                raise BadInputError(opts.clip_int8, f"int8 CLIP's embedding has cosine"
                                    f" {checks[INT8_GRAPH]['cosine_min']:.4f} to float32 on the"
                                    f" worst of {len(frames)} frames (below {INT8_COSINE:g});"
                                    " not exported")
        out = Folder(opts.out)
        out.makedirs()
        out.remove("export.json")
        digests = {}
        for name, path in paths.items():
            data = path.read_bytes()
            digests[name] = hashlib.sha256(data).hexdigest()
            out.write_bytes(path.name, data)
    description = describe(opts, loaded, encoder.identity, size, dim, checks)
    for name, digest in digests.items():
        description["graphs"][name]["sha256"] = digest
    out.write_bytes("export.json", (json.dumps(description, indent=1) + "\n").encode())
    log.info("wrote %s, %s and %s: the network's graph within %.1e of PyTorch (float64);"
             " saliency under onnxruntime within %.1e of PyTorch float32 (float32 rounding"
             " alone: %.1e); embedding within %.1e",
             *(out.url(name) for name in (*(paths[g].name for g in GRAPHS), "export.json")),
             checks["salmm"]["graph"], checks["salmm"]["onnxruntime"],
             checks["salmm"]["pytorch_float32"], checks["clip"])
    if INT8_GRAPH in checks:
        log.info("wrote %s: int8 CLIP, cosine to float32 %.4f on the worst of %d of your"
                 " frames (mean %.4f)", out.url(paths[INT8_GRAPH].name),
                 checks[INT8_GRAPH]["cosine_min"], checks[INT8_GRAPH]["frames"],
                 checks[INT8_GRAPH]["cosine_mean"])
    return description


def describe(opts: ExportOptions, loaded: Any, clip_identity: dict[str, Any],
             size: tuple[int, int], dim: int, checks: dict[str, float]) -> dict[str, Any]:
    """The contents of ``export.json``."""
    import onnxruntime  # lazy: the deploy extra

    height, width = size
    frame = {"name": "frame", "shape": ["batch", 3, height, width], "dtype": "float32",
             "range": [0.0, 1.0], "layout": "RGB, channels first, frame / 255"}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "size": {"height": height, "width": width}, "opset": opts.opset,
        "graphs": {
            "salmm": {"file": "salmm.onnx", "inputs": [frame, {
                "name": "embedding", "shape": ["batch", dim], "dtype": "float32",
                "from": "clip.onnx"}], "outputs": [{
                    "name": "saliency", "shape": ["batch", 1, height, width],
                    "dtype": "float32", "range": [0.0, 1.0]}],
                "checks": {
                    "float64_graph_max_abs_difference": checks["salmm"]["graph"],
                    "onnxruntime_float32_max_abs_difference": checks["salmm"]["onnxruntime"],
                    "pytorch_float32_rounding_max_abs": checks["salmm"]["pytorch_float32"]}},
            "clip": {"file": "clip.onnx", "inputs": [frame], "outputs": [{
                "name": "embedding", "shape": ["batch", dim], "dtype": "float32"}],
                "checks": {"onnxruntime_float32_relative_difference": checks["clip"]}},
            **({INT8_GRAPH: {"file": f"{INT8_GRAPH}.onnx", "inputs": [frame], "outputs": [{
                "name": "embedding", "shape": ["batch", dim], "dtype": "float32"}],
                "quantisation": "onnxruntime dynamic, int8 weights",
                "checks": checks[INT8_GRAPH]}} if INT8_GRAPH in checks else {}),
        },
        "checkpoint": {k: loaded.info[k] for k in ("path", "sha256", "kind", "epoch")},
        "clip": clip_identity,
        "software": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                     "onnxruntime": onnxruntime.__version__},
    }


def checked_export(folder: str | Path, loaded: LoadedModel, size: tuple[int, int],
                   int8: bool = False) -> dict[str, Any]:
    """``export.json`` of ``folder`` when it is an export of ``loaded``'s checkpoint at ``size``
    with the same CLIP encoder and its graphs are there (``clip-int8.onnx`` too when ``int8``);
    else BadInputError naming the file and the mismatch (one line)."""
    where = Path(folder) / "export.json"
    try:
        description = json.loads(where.read_text())
    except FileNotFoundError:
        raise BadInputError(where, "no such file: not an export (python -m salmm.export)"
                            ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInputError(where, f"unreadable ({type(err).__name__})") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise BadInputError(where, f"not a {FORMAT} description")
    if description.get("format_version") != FORMAT_VERSION:
        raise BadInputError(where, f"format version {description.get('format_version')!r}, this"
                            f" salmm reads {FORMAT_VERSION}; export the checkpoint again")
    checkpoint = description.get("checkpoint") or {}
    if checkpoint.get("sha256") != loaded.info["sha256"]:
        raise BadInputError(where, f"exported from another checkpoint (sha256"
                            f" {str(checkpoint.get('sha256'))[:12]}..., not"
                            f" {loaded.info['sha256'][:12]}... of {loaded.info['path']})")
    exported_size = description.get("size") or {}
    if (exported_size.get("height"), exported_size.get("width")) != tuple(size):
        raise BadInputError(where, f"graphs for {exported_size.get('width')}x"
                            f"{exported_size.get('height')} frames, not {size[1]}x{size[0]}")
    wanted = loaded.clip.identity()
    clip = {k: (description.get("clip") or {}).get(k) for k in wanted}
    if clip != wanted:
        raise BadInputError(where, f"CLIP {' / '.join(map(str, clip.values()))} exported, the"
                            f" checkpoint's options give {' / '.join(wanted.values())}")
    graphs = description.get("graphs") or {}
    for name in (*GRAPHS, INT8_GRAPH) if int8 or INT8_GRAPH in graphs else GRAPHS:
        if name not in graphs:
            raise BadInputError(where, f"has no {name}.onnx (export it with --clip-int8 VIDEO|DIR)")
        check_graph(Path(folder) / f"{name}.onnx", (graphs.get(name) or {}).get("sha256"))
    return description


def check_graph(path: Path, sha256: str | None) -> None:
    """BadInputError (one line naming the graph) unless ``path`` is there, has the sha256
    ``export.json`` records for it and keeps every weight inside the file (a graph whose
    external data points elsewhere, at a system file say, is refused before onnxruntime
    opens anything)."""
    import onnx  # lazy: the deploy extra
    from onnx.external_data_helper import uses_external_data  # lazy: likewise

    if not path.is_file():
        raise BadInputError(path, "missing from the export")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise BadInputError(path, "differs from the sha256 export.json records (the graph"
                            " changed after export); export the checkpoint again")
    try:
        model = onnx.load_from_string(data)
    except Exception as err:  # noqa: BLE001 - protobuf fails in many ways on garbage
        raise BadInputError(path, f"not an ONNX graph ({type(err).__name__})") from None
    if any(uses_external_data(t) for t in model.graph.initializer):
        raise BadInputError(path, "refers to external weight files; salmm's exports keep their"
                            " weights inside the graph")
