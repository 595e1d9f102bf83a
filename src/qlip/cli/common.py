"""What every command group shares: the user-error type, device and model resolution, image inputs, PNG outputs.

Conventions for every ``qlip`` command:

* a user mistake raises :class:`CLIError`: ``main`` prints ``error: <one line>`` and exits 2, never a traceback;
* bad data (an unreadable image, a corrupt sample) is named on stderr, counted and skipped; the command keeps
  its good outputs and exits 1;
* SIGINT exits 130, SIGTERM 143.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

log = logging.getLogger("qlip")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

EXIT_USER_ERROR = 2
EXIT_BAD_DATA = 1


class CLIError(Exception):
    """An error the user can act on: printed without a traceback, exit code 2."""


def _number(kind: type, low: float, high: float | None, what: str):
    """An argparse type: ``kind`` (int or float) within [low, high]; the message says what is expected."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (low <= value and (high is None or value <= high)) or not math.isfinite(value):  # NaN, inf too
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


positive_int = _number(int, 1, None, "a whole number >= 1")  # counts and batch sizes
non_negative_int = _number(int, 0, None, "a whole number >= 0")  # worker and thread counts
fraction = _number(float, 0.0, 1.0, "a fraction in [0, 1]")
non_negative_float = _number(float, 0.0, math.inf, "a finite number >= 0")  # temperatures
finite_float = _number(float, -math.inf, math.inf, "a finite number")  # sampling settings; the model checks ranges


def expand_images(paths: Sequence[str]) -> list[tuple[Path, Path]]:
    """Image inputs as (file, name relative to its root): files as given, folders expanded (sorted).

    The relative name keeps sub-folders (``cats/x.png``) so that outputs mirror the inputs and two inputs with
    the same file name never write the same output.
    """
    out: list[tuple[Path, Path]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise CLIError(f"{p} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out.extend((f, f.relative_to(p)) for f in found)
        elif p.is_file():
            inside = not p.is_absolute() and ".." not in p.parts
            out.append((p, p if inside else Path(p.name)))
        elif p.exists():
            raise CLIError(f"{p} is not a file or a directory")
        else:
            raise CLIError(f"{p}: no such file or directory")
    if not out:
        raise CLIError("no input images given")
    return out


def load_batches(
    files: list[Path], transform, batch_size: int, progress: bool
) -> Iterator[tuple[list[int], torch.Tensor | None, list[str]]]:
    """Yield (positions of the good files, batch tensor, error messages of the bad ones) per batch of files."""
    from ..progress import progress_bar
    from ..transforms import ImageLoadError, load_image

    bar = progress_bar(desc="images", total=len(files), unit="img", enabled=progress and len(files) >= 2 * batch_size)
    for start in range(0, len(files), batch_size):
        good, tensors, errors = [], [], []
        for i in range(start, min(start + batch_size, len(files))):
            try:
                background = getattr(transform, "background", "white")  # the transform's, for transparent files
                tensors.append(transform(load_image(files[i], background=background)))
                good.append(i)
            except ImageLoadError as e:
                errors.append(str(e))
        bar.update(min(batch_size, len(files) - start))
        yield good, (torch.stack(tensors) if tensors else None), errors
    bar.close()


def resolve_device(name: str | None) -> torch.device:
    """``--device`` value -> torch.device (default: cuda if available); a CLIError for unknown/unavailable ones."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name!r} is not a device torch knows ({e}); use cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise CLIError(f"--device {name}: qlip runs on cpu or cuda (mps where available), not {dev.type}")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CLIError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return dev


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the released models' precision), off elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def load_model(name: str, device: torch.device, parts: tuple[str, ...] | None = None):
    """create_model with loading problems turned into a CLIError (exit 2, no traceback)."""
    from ..factory import create_model
    from ..weights import WeightsMismatchError

    try:
        model = create_model(name, parts=parts, device=device)
    except (ValueError, TypeError, KeyError, FileNotFoundError, RuntimeError, OSError, WeightsMismatchError) as e:
        raise CLIError(f"cannot load model {name!r}: {e}") from e
    if getattr(model, "load_report", None) is None:
        log.warning("%s is a registered architecture: its weights are RANDOM (pass a model directory)", name)
    return model


def report_bad(errors: list[str]) -> None:
    for e in errors:
        print(f"error: {e}", file=sys.stderr)


def check_output_dir(out: str | Path, inputs: Sequence[Path] = (), option: str = "--out") -> Path:
    """An output folder that may be created: not a file, not under a file, not one of the input folders."""
    if not str(out).strip():  # Path("") would be the current folder
        raise CLIError(f"{option} is empty; name an output folder")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"{option} {out} is a file; name a folder")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise CLIError(f"{option} {out}: {parent} is a file, so no folder can be made under it")
    resolved = out.resolve()
    for p in inputs:
        if p.is_dir() and p.resolve() == resolved:
            raise CLIError(f"{option} {out} is an input folder: outputs would replace the inputs; choose another "
                           "folder")  # fmt: skip
    return out


def check_output_file(out: str | Path, inputs: Sequence[Path] = (), overwrite: bool = False,
                      option: str = "--out") -> Path:
    """An output file that may be written: not a folder, not under a file, not an input, not there unless asked."""
    if not str(out).strip():
        raise CLIError(f"{option} is empty; name an output file")
    out = Path(out)
    if out.is_dir():
        raise CLIError(f"{option} {out} is a folder; name a file inside it")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise CLIError(f"{option} {out}: {parent} is a file, so nothing can be written under it")
    if out.exists():
        resolved = out.resolve()
        if any(p.resolve() == resolved for p in inputs):
            raise CLIError(f"{option} {out} is one of the inputs; choose another output file")
        if not overwrite:
            raise CLIError(f"{option} {out} exists; pass --overwrite to replace it or choose another name")
    return out


def plan_outputs(names: Sequence[Path], out_dir: Path, suffix: str, overwrite: bool) -> list[Path]:
    """Output paths that mirror the inputs' relative names, checked before anything is written.

    ``a/x.png`` and ``b/x.png`` give ``OUT/a/x.png`` and ``OUT/b/x.png``; ``x.png`` and ``x.jpg`` (which would
    both become ``x.png``) keep their suffix in the name (``x.png.png``, ``x.jpg.png``). An existing file is never
    replaced without ``overwrite``.
    """
    base = [Path(n).with_suffix(suffix) for n in names]
    counts: dict[Path, int] = {}
    for b in base:
        counts[b] = counts.get(b, 0) + 1
    paths = [out_dir / (Path(n).parent / (Path(n).name + suffix) if counts[b] > 1 else b) for n, b in zip(names, base)]
    seen: set[Path] = set()
    for i, p in enumerate(paths):  # still the same (two absolute inputs with one name): number them
        if p in seen:
            paths[i] = p.with_name(f"{p.stem}-{i}{suffix}")
        seen.add(paths[i])
    if not overwrite:
        existing = [p for p in paths if p.exists()]
        if existing:
            more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
            raise CLIError(f"{existing[0]}{more} already exist(s); pass --overwrite to replace them or choose "
                           "another --out")  # fmt: skip
    return paths


def save_pngs(images: torch.Tensor, paths: Sequence[Path]) -> list[Path]:
    """Write images (CLIP-normalized, (B, 3, H, W)) as PNGs, each atomically; parents are created."""
    from ..fileio import atomic_write
    from ..transforms import to_pil_images

    written = []
    for img, path in zip(to_pil_images(images.float().cpu()), paths):
        atomic_write(path, lambda tmp, img=img: img.save(tmp, format="PNG"))
        written.append(path)
    return written


def background_color(text: str) -> str:
    """An argparse type: white, black or #rrggbb (the color transparent images are flattened onto)."""
    from ..transforms import parse_background

    try:
        parse_background(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_image_options(p: argparse.ArgumentParser) -> None:
    """--resize and --background: how a photograph becomes the model's square (see :mod:`qlip.transforms`)."""
    p.add_argument("--resize", choices=("crop", "pad"), default="crop",
                   help="crop: fill the square, cutting the longer side (default); pad: keep the whole image")
    p.add_argument("--background", type=background_color, default="white",
                   help="color transparent images are flattened onto and pad fills with: white (default), black "
                   "or #rrggbb")  # fmt: skip


def image_transform_for(args: argparse.Namespace, image_size: int):
    """The eval transform with the command's --resize / --background (the defaults when it has none)."""
    from ..transforms import image_transform

    return image_transform(image_size, train=False, resize=getattr(args, "resize", "crop"),
                           background=getattr(args, "background", "white"))  # fmt: skip


def add_model_options(p: argparse.ArgumentParser, model_required: bool = True, batch_size: int = 8) -> None:
    """--model, --device, --batch-size and --quiet, as every model command takes them."""
    p.add_argument("--model", required=model_required, help="model directory, registered name or hf-hub:ORG/NAME")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--batch-size", type=positive_int, default=batch_size)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_runtime_option(p: argparse.ArgumentParser) -> None:
    """--runtime: what runs the float32 encoder on CPU (qlip encode, qlip tokenize)."""
    p.add_argument("--runtime", default="auto", choices=("auto", "torch", "onnxruntime"),
                   help="CPU float32 encoder: onnxruntime (fastest, same tokens; needs the export extra), torch, or "
                        "auto = onnxruntime when installed and the job holds 64 images or more")  # fmt: skip
