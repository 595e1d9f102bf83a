"""The tokenizer as standalone graphs: ONNX (for onnxruntime) and ``torch.export`` (.pt2), with a manifest.

Two graphs cover the token API, each with a dynamic batch axis:

    encoder: CLIP-normalized images (B, 3, S, S) float32 -> token indices (B, h, w) int64
    decoder: token indices (B, h, w) int64 -> pixels (B, 3, S, S) float32, CLIP-normalized

The BSQ sign -> index step is in the graph and stays integer arithmetic (``latents > 0``, a sum of constant powers
of two), so an exported encoder gives the eager model's indices whenever its float latents have the same signs.
Decoder indices are not range-checked inside the graph: bits above the model's d are ignored.

An export folder holds the graph files and ``qlip-export.json`` (the manifest: model, grid, bits, image size,
normalization, batch range, and per format its files with their sha256, the ONNX opset and the torch version).
Exporting adds to a folder only what this module wrote before: a file it did not write is never replaced.
Loading checks every file against its sha256 first, and a .pt2 archive is only loaded when nothing in it needs
unpickling (``torch.export.load`` would unpickle some entries).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from .fileio import atomic_write, write_json_atomic
from .models.qlip import QLIP
from .quantizers.bsq import bits_to_codes, bits_to_indices, codes_to_bits, indices_to_bits
from .transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

log = logging.getLogger(__name__)

MANIFEST_NAME = "qlip-export.json"
MANIFEST_FORMAT = "qlip-export"
FORMATS = ("onnx", "torch-export")
GRAPHS = ("encoder", "decoder")
_SUFFIX = {"onnx": ".onnx", "torch-export": ".pt2"}
ONNX_OPSET = 18
DEFAULT_MAX_BATCH = 1024
# Traced with two images: a batch of one would let the tracer specialize the batch axis to 1.
_EXAMPLE_BATCH = 2


class ExportError(ValueError):
    """A request the user can fix: a missing part, a folder this module did not write, a batch the graph refuses."""


# ----------------------------------------------------------------------------------------------------------------
# The graphs
# ----------------------------------------------------------------------------------------------------------------


class EncoderGraph(nn.Module):
    """Images (B, 3, S, S) -> token indices (B, h, w) int64, or the pre-quantization latents (B, N, d) float32.

    The same modules as :meth:`QLIP.encode` (no CLS head, no text tower); ``output="latents"`` is the graph the
    onnxruntime inference path runs (see :mod:`qlip.inference`).
    """

    def __init__(self, model: QLIP, output: str = "indices"):
        super().__init__()
        model._need("vision")
        model._need("quantizer")
        if output not in ("indices", "latents"):
            raise ValueError(f"unknown encoder output {output!r}; choose 'indices' or 'latents'")
        self.visual, self.quant_in = model.visual, model.quant_in
        self.grid_size, self.output = model.grid_size, output

    def forward(self, images: Tensor) -> Tensor:
        u = self.quant_in(self.visual(images).patches).float()  # (B, N, d)
        if self.output == "latents":
            return u
        indices = bits_to_indices(codes_to_bits(u))  # (B, N) int64, exact integer packing
        return rearrange(indices, "b (h w) -> b h w", h=self.grid_size)


class DecoderGraph(nn.Module):
    """Token indices (B, h, w) int64, known valid -> pixels (B, 3, S, S) float32 (:meth:`QLIP.decode` unchecked)."""

    def __init__(self, model: QLIP):
        super().__init__()
        model._need("quantizer")
        model._need("decoder")
        self.quant_out, self.decoder = model.quant_out, model.decoder
        self.num_bits = model.num_bits

    def forward(self, indices: Tensor) -> Tensor:
        bits = indices_to_bits(rearrange(indices, "b h w -> b (h w)"), self.num_bits, check_range=False)
        codes = bits_to_codes(bits)  # (B, N, d) in {+-1/sqrt(d)}
        return self.decoder(self.quant_out(codes.to(self.quant_out.fc1.weight.dtype))).float()


def _graph_and_example(model: QLIP, graph: str, output: str = "indices") -> tuple[nn.Module, Tensor]:
    g, s = model.grid_size, model.image_size
    if graph == "encoder":
        return EncoderGraph(model, output).eval(), torch.zeros(_EXAMPLE_BATCH, 3, s, s)
    return DecoderGraph(model).eval(), torch.zeros(_EXAMPLE_BATCH, g, g, dtype=torch.int64)


def _batch_dim(max_batch: int) -> dict[int, Any]:
    return {0: torch.export.Dim("batch", min=1, max=max_batch)}


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Keep torch's exporter chatter (torchvision ops it skips, its own deprecations) out of qlip's output."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def export_program(model: QLIP, graph: str, max_batch: int = DEFAULT_MAX_BATCH,
                   output: str = "indices") -> torch.export.ExportedProgram:  # fmt: skip
    """``torch.export`` of one graph ("encoder" or "decoder") with a batch axis of 1 to ``max_batch``."""
    module, example = _graph_and_example(model, graph, output)
    with torch.no_grad(), quiet_exporters():
        return torch.export.export(module, (example,), dynamic_shapes=(_batch_dim(max_batch),))


def onnx_program(model: QLIP, graph: str, max_batch: int = DEFAULT_MAX_BATCH, output: str = "indices"):
    """The ONNX program (``torch.onnx.ONNXProgram``) of one graph; needs the ``onnxscript`` package."""
    ep = export_program(model, graph, max_batch, output)
    names = {"encoder": (["images"], [output]), "decoder": (["indices"], ["pixels"])}[graph]
    with quiet_exporters():
        return torch.onnx.export(ep, dynamo=True, opset_version=ONNX_OPSET, input_names=names[0],
                                 output_names=names[1], verbose=False)  # fmt: skip


def onnx_session(model_bytes_or_path: bytes | str | Path, threads: int | None = None):
    """An onnxruntime CPU session; ``threads`` defaults to torch's intra-op thread count (one inter-op thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    source = model_bytes_or_path if isinstance(model_bytes_or_path, bytes) else str(model_bytes_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnx_available() -> bool:
    """Whether ONNX export (torch's exporter needs onnxscript) and onnxruntime are both installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


# ----------------------------------------------------------------------------------------------------------------
# Export folders
# ----------------------------------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an export folder; :class:`ExportError` if there is none or it is not ours."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ExportError(f"{directory} is not a folder; pass the folder `qlip export` wrote")
    if not path.is_file():
        raise ExportError(f"{directory} has no {MANIFEST_NAME}; pass a folder written by `qlip export`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}); export the model again into a new folder") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ExportError(f"{path} is not a qlip export manifest; pass a folder written by `qlip export`")
    return manifest


def _model_fields(model: QLIP, source: str, max_batch: int) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "model": model.cfg.name,
        "source": source,
        "image_size": model.image_size,
        "grid_size": model.grid_size,
        "num_bits": model.num_bits,
        "normalization": {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD), "range": "RGB in [0, 1]"},
        "batch": {"min": 1, "max": max_batch},
    }


def source_sha256(source: str) -> str | None:
    """The sha256 of a model directory's weights file (None for a registered name): which checkpoint was exported."""
    from .checkpoints import WEIGHTS_NAME

    path = Path(source) / WEIGHTS_NAME if source else None
    return sha256_file(path) if path is not None and path.is_file() else None


def plan_export(directory: str | Path, model: QLIP, fmt: str, graphs: Sequence[str], overwrite: bool,
                max_batch: int, source: str = "") -> dict[str, Any] | None:  # fmt: skip
    """Check that ``fmt``'s files may be written into ``directory``; returns the manifest already there (or None).

    A file is only ever replaced when the folder's manifest lists it (this module wrote it) and ``overwrite`` is
    set; a folder holding another model's export, or files of these names that no manifest lists, is refused.
    """
    directory = Path(directory)
    names = [f"{g}{_SUFFIX[fmt]}" for g in graphs]
    existing = read_manifest(directory) if (directory / MANIFEST_NAME).exists() else None
    if existing is not None:
        ours = {f["path"] for entry in existing.get("exports", {}).values() for f in entry.get("files", {}).values()}
        same = all(existing.get(k) == v for k, v in _model_fields(model, "", max_batch).items()
                   if k not in ("source", "batch"))  # fmt: skip
        if not same:
            raise ExportError(f"{directory} holds an export of {existing.get('model')!r} "
                              f"({existing.get('grid_size')}x{existing.get('grid_size')} tokens, "
                              f"{existing.get('num_bits')} bits), not of this {model.cfg.name}; choose another --out")
        if (existing.get("source"), existing.get("source_sha256")) != (source, source_sha256(source)):
            raise ExportError(f"{directory} holds an export of {existing.get('source')!r} (weights sha256 "
                              f"{str(existing.get('source_sha256'))[:12]}), not of these weights; mixing two "
                              "checkpoints in one folder is refused: choose another --out")  # fmt: skip
        if existing.get("batch", {}).get("max") != max_batch:
            raise ExportError(f"{directory} holds graphs exported for batches up to {existing['batch']['max']}; "
                              f"export with --max-batch {existing['batch']['max']} or into another folder")
    else:
        ours = set()
    for name in names:
        path = directory / name
        if not path.exists():
            continue
        if name not in ours:
            raise ExportError(f"{path} exists and was not written by qlip export; move it or choose another --out")
        if not overwrite:
            raise ExportError(f"{path} exists; pass --overwrite to replace it or choose another --out")
    return existing


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    format: str
    files: dict[str, Path]  # graph name -> file
    manifest: dict[str, Any]


def export_model(model: QLIP, directory: str | Path, fmt: str, *, graphs: Sequence[str] | None = None,
                 source: str = "", overwrite: bool = False,
                 max_batch: int = DEFAULT_MAX_BATCH) -> ExportResult:  # fmt: skip
    """Write the encoder and/or decoder graph of ``model`` in ``fmt`` ("onnx" or "torch-export") and the manifest.

    Args:
        model: a QLIP model (any layout it was loaded from); exported as float32 on the CPU, from a copy when it
            is elsewhere.
        directory: the export folder (created; other files in it are left alone).
        fmt: "onnx" (needs onnxscript) or "torch-export".
        graphs: ("encoder", "decoder") by default, each only when the model has the parts it needs.
        source: what the model was loaded from, recorded in the manifest for ``qlip export check``.
        overwrite: replace graph files this module wrote before.
        max_batch: the largest batch the graphs take.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if graphs is None:
        graphs = [g for g in GRAPHS if _has_graph_parts(model, g)]
    graphs = list(dict.fromkeys(graphs))
    for g in graphs:
        if g not in GRAPHS:
            raise ExportError(f"unknown graph {g!r}; choose from {', '.join(GRAPHS)}")
        if not _has_graph_parts(model, g):
            part = "decoder" if g == "decoder" else "vision encoder"
            raise ExportError(f"{model.cfg.name} has no {part}, so it has no {g} graph to export; "
                              f"ask for --parts {'encoder' if g == 'decoder' else 'decoder'} only")  # fmt: skip
    if not graphs:
        raise ExportError(f"{model.cfg.name} has neither an encoder (vision + quantizer) nor a decoder to export")
    if fmt == "onnx" and not onnx_available():
        raise ExportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'qlip[export]'")
    directory = Path(directory)
    existing = plan_export(directory, model, fmt, graphs, overwrite, max_batch, source)
    if model.device.type != "cpu" or any(t.dtype != torch.float32 for t in model.parameters()):
        model = copy.deepcopy(model).float().cpu()  # the graphs are float32 CPU graphs; the caller's model stays
    model.eval()
    files: dict[str, Path] = {}
    entries: dict[str, Any] = {}
    for g in graphs:
        path = directory / f"{g}{_SUFFIX[fmt]}"
        log.info("exporting the %s of %s to %s", g, model.cfg.name, path)
        if fmt == "onnx":
            program = onnx_program(model, g, max_batch)
            atomic_write(path, lambda tmp, p=program: p.save(tmp, external_data=False))
        else:
            ep = export_program(model, g, max_batch)
            ep._example_inputs = None  # nothing in the archive but tensors and JSON (see load_pt2)
            atomic_write(path, lambda tmp, e=ep: _save_pt2(e, tmp))
        files[g] = path
        entries[g] = {"path": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                      **_io_spec(model, g)}  # fmt: skip
    manifest = _model_fields(model, source, max_batch)
    manifest["source_sha256"] = source_sha256(source)
    manifest["exports"] = dict(existing.get("exports", {})) if existing else {}
    previous = manifest["exports"].get(fmt, {}).get("files", {})
    manifest["exports"][fmt] = {
        "files": {**previous, **entries},
        "opset": ONNX_OPSET if fmt == "onnx" else None,
        "torch": torch.__version__,
    }
    write_json_atomic(directory / MANIFEST_NAME, manifest)
    return ExportResult(directory, fmt, files, manifest)


def _save_pt2(ep: torch.export.ExportedProgram, path: Path) -> None:
    with open(path, "wb") as f:  # a file object: torch warns about a temporary name without the .pt2 suffix
        torch.export.save(ep, f)


def _has_graph_parts(model: QLIP, graph: str) -> bool:
    if graph == "encoder":
        return model.visual is not None and model.quantizer is not None
    return model.decoder is not None and model.quantizer is not None


def _io_spec(model: QLIP, graph: str) -> dict[str, Any]:
    g, s = model.grid_size, model.image_size
    images = {"name": "images", "shape": ["batch", 3, s, s], "dtype": "float32"}
    indices = {"name": "indices", "shape": ["batch", g, g], "dtype": "int64"}
    pixels = {"name": "pixels", "shape": ["batch", 3, s, s], "dtype": "float32"}
    return {"input": images, "output": indices} if graph == "encoder" else {"input": indices, "output": pixels}


# ----------------------------------------------------------------------------------------------------------------
# Loading and running exported graphs
# ----------------------------------------------------------------------------------------------------------------


def check_pt2_archive(path: str | Path) -> None:
    """Refuse a .pt2 archive that ``torch.export.load`` would need to unpickle anything from (a swapped file).

    Weights and constants must be raw tensors (``use_pickle`` false, no custom or opaque objects), and any pickled
    entry (sample inputs, legacy weight files) must load with ``weights_only=True``, so that torch's fallback to
    full unpickling can never run.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith("_config.json") and "/data/" in name:
                    config = json.loads(z.read(name)).get("config", {})
                    for key, meta in config.items():
                        pickled = meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(
                            ("weight_", "tensor_"))  # fmt: skip
                        if pickled:
                            raise ExportError(f"{path}: entry {key!r} would be unpickled; refusing to load it "
                                              "(export the model again with qlip export)")  # fmt: skip
                elif name.endswith(".pt"):
                    data = z.read(name)
                    if data:
                        torch.load(io.BytesIO(data), weights_only=True)
    except (zipfile.BadZipFile, json.JSONDecodeError, OSError) as e:
        raise ExportError(f"{path} is not a readable .pt2 archive ({e}); export the model again") from e
    except ExportError:
        raise
    except Exception as e:  # torch.load(weights_only=True) refusing an object
        raise ExportError(f"{path} holds a pickled object that is not plain tensors; refusing to load it") from e


class ExportedTokenizer:
    """Runs one format of an export folder: ``encode(images) -> indices`` and ``decode(indices) -> pixels``."""

    def __init__(self, directory: str | Path, fmt: str, threads: int | None = None):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        exports = self.manifest.get("exports", {})
        if fmt not in exports:
            have = ", ".join(sorted(exports)) or "none"
            raise ExportError(f"{self.directory} holds no {fmt} export (it has: {have}); run qlip export "
                              f"--format {fmt} first")  # fmt: skip
        self.format = fmt
        self.batch_max = int(self.manifest["batch"]["max"])
        self._runners: dict[str, Any] = {}
        for graph, entry in exports[fmt]["files"].items():
            path = self.directory / entry["path"]
            if Path(entry["path"]).name != entry["path"] or not path.is_file():
                raise ExportError(f"{path} listed in {MANIFEST_NAME} is missing; export the model again")
            if sha256_file(path) != entry["sha256"]:
                raise ExportError(f"{path} does not match the sha256 in {MANIFEST_NAME} (changed since it was "
                                  "exported); export the model again")  # fmt: skip
            self._runners[graph] = self._load(path, threads)

    def _load(self, path: Path, threads: int | None):
        if self.format == "onnx":
            if not onnx_available():
                raise ExportError(f"running {path.name} needs onnxruntime: pip install 'qlip[export]'")
            session = onnx_session(path, threads)
            name = session.get_inputs()[0].name
            return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        check_pt2_archive(path)
        with quiet_exporters():
            module = torch.export.load(str(path)).module()
        return lambda x: module(x)

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(self._runners)

    def _run(self, graph: str, x: Tensor) -> Tensor:
        if graph not in self._runners:
            raise ExportError(f"{self.directory} has no {graph} graph in its {self.format} export")
        if not 1 <= x.shape[0] <= self.batch_max:
            raise ExportError(f"a batch of {x.shape[0]} does not fit the exported graphs (batch 1 to "
                              f"{self.batch_max}); use a batch size in that range")  # fmt: skip
        with torch.inference_mode():
            return self._runners[graph](x.contiguous())

    def encode(self, images: Tensor) -> Tensor:
        """CLIP-normalized images (B, 3, S, S) -> token indices (B, h, w) int64."""
        s = self.manifest["image_size"]
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ExportError(f"the exported encoder takes images (B, 3, {s}, {s}), got {tuple(images.shape)}")
        return self._run("encoder", images.float().cpu())

    def decode(self, indices: Tensor) -> Tensor:
        """Token indices (B, h, w) in [0, 2**d) -> pixels (B, 3, S, S) float32, CLIP-normalized."""
        g, d = self.manifest["grid_size"], self.manifest["num_bits"]
        if indices.ndim != 3 or tuple(indices.shape[1:]) != (g, g):
            raise ExportError(f"the exported decoder takes indices (B, {g}, {g}), got {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= 2**d):
            raise ExportError(f"token indices must lie in [0, 2**{d}) for this export")
        return self._run("decoder", indices.to(torch.int64).cpu())


# ----------------------------------------------------------------------------------------------------------------
# Runtime against eager PyTorch
# ----------------------------------------------------------------------------------------------------------------

# Largest |pixel difference| accepted between an exported decoder and eager PyTorch, in [0, 1] pixel space: a
# quarter of one 8-bit level, far above float32 rounding (~1e-6) and far below anything visible.
PIXEL_TOLERANCE = 1e-3


@dataclass
class CheckReport:
    """Exported graphs against eager PyTorch on the same images (tokens) and the same tokens (pixels)."""

    format: str
    images: int = 0
    tokens: int = 0
    token_mismatches: int = 0
    pixel_max_abs_diff: float | None = None  # [0, 1] pixel space; None without a decoder graph
    pixel_sq_err: float = 0.0
    pixel_count: int = 0
    pixel_tolerance: float = PIXEL_TOLERANCE

    @property
    def pixel_psnr_db(self) -> float | None:
        """PSNR of the runtime's pixels against eager's, in [0, 1] space (inf when identical)."""
        if not self.pixel_count:
            return None
        mse = self.pixel_sq_err / self.pixel_count
        return float("inf") if mse == 0 else float(10 * torch.log10(torch.tensor(1.0 / mse)))

    @property
    def ok(self) -> bool:
        pixels_ok = self.pixel_max_abs_diff is None or self.pixel_max_abs_diff <= self.pixel_tolerance
        return self.token_mismatches == 0 and pixels_ok

    def add(self, exported: ExportedTokenizer, model: QLIP, images: Tensor) -> None:
        """Compare one batch: runtime tokens vs ``model.encode``, runtime pixels vs ``model.decode`` of the same
        (eager) tokens, so that a token mismatch never shows up twice."""
        from .transforms import denormalize

        with torch.inference_mode():
            eager_tokens = model.encode(images)  # (B, h, w): what both graphs are held against
            if "encoder" in exported.graphs:
                tokens = exported.encode(images)
                self.tokens += tokens.numel()
                self.token_mismatches += int((tokens != eager_tokens).sum())
            if "decoder" in exported.graphs:
                a = denormalize(exported.decode(eager_tokens)).clamp(0, 1)
                b = denormalize(model.decode(eager_tokens).float()).clamp(0, 1)
                diff = (a - b).abs()
                worst = float(diff.max())
                self.pixel_max_abs_diff = max(worst, self.pixel_max_abs_diff or 0.0)
                self.pixel_sq_err += float(diff.double().pow(2).sum())
                self.pixel_count += diff.numel()
        self.images += images.shape[0]

    def as_dict(self) -> dict[str, Any]:
        keys = ("format", "images", "tokens", "token_mismatches", "pixel_max_abs_diff", "pixel_psnr_db",
                "pixel_tolerance", "ok")  # fmt: skip
        return {k: getattr(self, k) for k in keys}
