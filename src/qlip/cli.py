"""The ``qlip`` command line: thin dispatch to the library.

    qlip models
    qlip encode IMAGES... --model M --out tokens.safetensors
    qlip decode tokens.safetensors --model M --out DIR
    qlip reconstruct IMAGES... --model M --out DIR
    qlip classify IMAGES... --model M --labels "a dog,a cat"
    qlip tokenizer train CAPTIONS.txt --vocab-size N --out DIR
    qlip data {write-shards,check,preview} ...
    qlip train CONFIG [a.b=c ...]          qlip balance CONFIG
    qlip eval {zero-shot,linear-probe,recon,all} ...
    qlip tokenize --model M --data SRC --out DIR
    qlip experiment {balance-sweep,balance-modes,recipes,report} ...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

log = logging.getLogger("qlip")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TOKEN_FILE_FORMAT = "qlip-tokens-v1"


class CLIError(Exception):
    """An error the user can act on: printed without a traceback, exit code 2."""


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def _expand_images(paths: Sequence[str]) -> list[Path]:
    """Files as given; directories expanded to the image files inside them (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise CLIError(f"{p} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise CLIError(f"{p}: no such file or directory")
    if not out:
        raise CLIError("no input images given")
    return out


def _load_batches(
    files: list[Path], transform, batch_size: int, progress: bool
) -> Iterator[tuple[list[Path], torch.Tensor, list[str]]]:
    """Yield (good files, batch tensor, error messages of the bad ones) per batch of files."""
    from tqdm import tqdm

    from .transforms import ImageLoadError, load_image

    bar = tqdm(total=len(files), unit="img", disable=not progress or len(files) < 2 * batch_size, file=sys.stderr)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        good, tensors, errors = [], [], []
        for f in chunk:
            try:
                tensors.append(transform(load_image(f)))
                good.append(f)
            except ImageLoadError as e:
                errors.append(str(e))
        bar.update(len(chunk))
        yield good, (torch.stack(tensors) if tensors else None), errors
    bar.close()


def resolve_device(name: str | None) -> torch.device:
    """``--device`` value -> torch.device (default: cuda if available); a CLIError for unknown/unavailable ones."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name!r} is not a device torch knows ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def load_model(name: str, device: torch.device, parts: tuple[str, ...] | None = None):
    """create_model with loading problems turned into a CLIError (exit 2, no traceback)."""
    from .checkpoints import CheckpointMismatchError
    from .factory import create_model

    try:
        model = create_model(name, parts=parts, device=device)
    except (ValueError, FileNotFoundError, RuntimeError, CheckpointMismatchError) as e:
        raise CLIError(f"cannot load model {name!r}: {e}") from e
    if getattr(model, "load_report", None) is None:
        log.warning("%s is a registered architecture: its weights are RANDOM (pass a model directory)", name)
    return model


def _report_bad(errors: list[str]) -> None:
    for e in errors:
        print(f"error: {e}", file=sys.stderr)


def _save_pngs(images: torch.Tensor, names: list[str], out_dir: Path) -> list[Path]:
    from .transforms import to_pil_images

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for img, name in zip(to_pil_images(images.float().cpu()), names):
        path = out_dir / f"{name}.png"
        img.save(path)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    from .factory import get_model_config, list_models
    from .models.qlip import QLIP

    rows = []
    for name in list_models():
        cfg = get_model_config(name)
        with torch.device("meta"):
            n_params = sum(p.numel() for p in QLIP(cfg).parameters())
        v, q = cfg.vision, cfg.quantizer
        rows.append(
            {
                "name": name,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "tokens": f"{v.grid_size}x{v.grid_size}",
                "bits": q.dim if q else None,
                "compression_ratio": round(cfg.compression_ratio, 1) if q else None,
                "params_M": round(n_params / 1e6, 1),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'name':<16} {'image':>5} {'patch':>5} {'tokens':>7} {'bits':>4} {'CR':>6} {'params':>8}"
    print(header)
    for r in rows:
        print(
            f"{r['name']:<16} {r['image_size']:>5} {r['patch_size']:>5} {r['tokens']:>7} {r['bits']:>4} "
            f"{r['compression_ratio']:>6} {r['params_M']:>7}M"
        )
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from .transforms import image_transform

    files = _expand_images(args.images)
    device = resolve_device(args.device)
    model = load_model(args.model, device, parts=("vision", "quantizer"))
    transform = image_transform(model.image_size, train=False)
    tokens, names, bad = [], [], []
    with torch.inference_mode(), _autocast(device):
        for good, batch, errors in _load_batches(files, transform, args.batch_size, not args.quiet):
            bad.extend(errors)
            if batch is None:
                continue
            tokens.append(model.encode(batch.to(device), output=args.output).cpu())
            names.extend(str(f) for f in good)
    _report_bad(bad)
    if not tokens:
        raise CLIError("none of the input images could be read")
    key = args.output
    tensor = torch.cat(tokens)
    if key == "bits":
        tensor = tensor.to(torch.uint8)
    meta = {
        "format": TOKEN_FILE_FORMAT,
        "model": model.cfg.name,
        "kind": key,
        "grid": str(model.grid_size),
        "bits": str(model.num_bits),
        "group_size": str(model.cfg.quantizer.group_size),
        "image_size": str(model.image_size),
        "files": json.dumps(names),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({key: tensor.contiguous()}, str(tmp), metadata=meta)
    tmp.replace(out)
    print(f"wrote {out}: {key} {tuple(tensor.shape)} for {len(names)} image(s) ({model.num_bits} bits per token)")
    return 1 if bad else 0


def read_token_file(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """Read a token file written by ``qlip encode`` -> (tokens, metadata)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CLIError(f"{path}: no such token file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            if meta.get("format") != TOKEN_FILE_FORMAT or len(keys) != 1:
                raise CLIError(f"{path} is not a qlip token file (write one with `qlip encode`)")
            return f.get_tensor(keys[0]), meta
    except CLIError:
        raise
    except Exception as e:
        raise CLIError(f"{path} is not a readable safetensors token file ({e})") from e


def cmd_decode(args: argparse.Namespace) -> int:
    tokens, meta = read_token_file(args.tokens)
    device = resolve_device(args.device)
    model = load_model(args.model, device, parts=("quantizer", "decoder"))
    grid, bits = int(meta.get("grid", -1)), int(meta.get("bits", -1))
    if grid != model.grid_size or bits != model.num_bits:
        raise CLIError(
            f"{args.tokens} holds {grid}x{grid} tokens of {bits} bits (model {meta.get('model')}), but "
            f"{model.cfg.name} decodes {model.grid_size}x{model.grid_size} tokens of {model.num_bits} bits"
        )
    if meta.get("model") != model.cfg.name:
        log.warning("tokens were made by %s, decoding with %s", meta.get("model"), model.cfg.name)
    kind = meta.get("kind", "indices")
    if kind == "codes":
        raise CLIError("decode takes indices, bits or group indices; re-encode with --output indices")
    names = [Path(f).stem for f in json.loads(meta.get("files", "[]"))]
    if len(names) != tokens.shape[0]:
        names = [f"image_{i:05d}" for i in range(tokens.shape[0])]
    out_dir = Path(args.out)
    written = []
    with torch.inference_mode(), _autocast(device):
        for start in range(0, tokens.shape[0], args.batch_size):
            chunk = tokens[start : start + args.batch_size].to(device)
            try:
                images = model.decode(chunk, kind=kind, group_size=int(meta.get("group_size", 1)))
            except (ValueError, TypeError) as e:
                raise CLIError(f"{args.tokens}: {e}") from e
            written += _save_pngs(images, names[start : start + args.batch_size], out_dir)
    print(f"wrote {len(written)} image(s) to {out_dir}")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from .eval.metrics import psnr
    from .transforms import image_transform, to_uint8

    files = _expand_images(args.images)
    device = resolve_device(args.device)
    model = load_model(args.model, device, parts=("vision", "quantizer", "decoder"))
    transform = image_transform(model.image_size, train=False)
    out_dir = Path(args.out)
    bad, values = [], []
    with torch.inference_mode(), _autocast(device):
        for good, batch, errors in _load_batches(files, transform, args.batch_size, not args.quiet):
            bad.extend(errors)
            if batch is None:
                continue
            recon = model.reconstruct(batch.to(device)).float().cpu()
            scores = psnr(to_uint8(batch), to_uint8(recon))
            _save_pngs(recon, [f.stem for f in good], out_dir)
            if args.save_inputs:
                _save_pngs(batch, [f"{f.stem}_input" for f in good], out_dir)
            for f, s in zip(good, scores.tolist()):
                values.append(s)
                print(f"{f}\tPSNR {s:.2f} dB")
    _report_bad(bad)
    if not values:
        raise CLIError("none of the input images could be read")
    print(f"mean PSNR {sum(values) / len(values):.2f} dB over {len(values)} image(s); PNGs in {out_dir}")
    return 1 if bad else 0


def cmd_classify(args: argparse.Namespace) -> int:
    from .factory import get_tokenizer
    from .transforms import image_transform

    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if len(labels) < 2:
        raise CLIError(f"--labels needs at least two comma-separated labels, got {args.labels!r}")
    templates = args.template or ["{}"]
    for t in templates:
        if "{}" not in t:
            raise CLIError(f"--template {t!r} must contain '{{}}' where the label goes")
    files = _expand_images(args.images)
    device = resolve_device(args.device)
    model = load_model(args.model, device, parts=("vision", "text"))
    try:
        tokenizer = get_tokenizer(args.model)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    transform = image_transform(model.image_size, train=False)
    with torch.inference_mode(), _autocast(device):
        text = tokenizer([t.format(label) for label in labels for t in templates]).to(device)
        emb = model.encode_text(text, normalize=True).float().view(len(labels), len(templates), -1)
        classifier = torch.nn.functional.normalize(emb.mean(dim=1), dim=-1)  # (C, D)
        scale = model.logit_scale.exp().float()
        bad = []
        for good, batch, errors in _load_batches(files, transform, args.batch_size, not args.quiet):
            bad.extend(errors)
            if batch is None:
                continue
            img = model.encode_image(batch.to(device), normalize=True).float()
            probs = (scale * img @ classifier.T).softmax(dim=-1).cpu()
            for f, p in zip(good, probs):
                top = p.argsort(descending=True)[: args.top]
                shown = ", ".join(f"{labels[i]} {p[i]:.1%}" for i in top)
                print(f"{f}\t{shown}")
    _report_bad(bad)
    return 1 if bad else 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .tokenizer import train_bpe

    path = Path(args.captions)
    if not path.is_file():
        raise CLIError(f"{path}: no such captions file (one caption per line)")
    captions = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    captions = [c for c in captions if c]
    if not captions:
        raise CLIError(f"{path} holds no captions")
    try:
        tok = train_bpe(captions, args.vocab_size)
    except ValueError as e:
        raise CLIError(str(e)) from e
    tok.save_pretrained(args.out)
    print(f"trained a {tok.vocab_size}-token vocabulary on {len(captions)} captions -> {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required, help="model directory, registered name or hf-hub:ORG/NAME")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlip", description="QLIP visual tokenizer: encode, decode, train, evaluate")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered architectures")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("encode", help="images -> BSQ token file (safetensors)")
    p.add_argument("images", nargs="+", help="image files or directories")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--output", choices=("indices", "bits", "group_indices"), default="indices")
    _add_common(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="token file -> PNG images")
    p.add_argument("tokens", help="a token file written by `qlip encode`")
    p.add_argument("--out", required=True, help="output directory")
    _add_common(p)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("reconstruct", help="images -> tokens -> images; writes PNGs and prints PSNR")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--save-inputs", action="store_true", help="also write the preprocessed inputs")
    _add_common(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("classify", help="zero-shot classification of images against text labels")
    p.add_argument("images", nargs="+")
    p.add_argument("--labels", required=True, help='comma-separated labels, e.g. "a dog,a cat"')
    p.add_argument("--template", action="append", help='prompt template with {} (repeatable), e.g. "a photo of {}."')
    p.add_argument("--top", type=int, default=3)
    _add_common(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("tokenizer", help="text tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="SUBCOMMAND")
    t = tsub.add_parser("train", help="train a small CLIP-style BPE vocabulary from a captions file")
    t.add_argument("captions", help="text file, one caption per line")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="directory for vocab.json + merges.txt")
    t.set_defaults(func=cmd_tokenizer_train)

    for register in _extra_command_registrars():
        register(sub)
    return parser


def _extra_command_registrars():
    """Command groups that live beside their code (data, train, eval, ...)."""
    from .data.cli import add_data_commands
    from .eval.cli import add_eval_commands
    from .experiments.cli import add_experiment_commands
    from .tokenize_dataset import add_tokenize_commands
    from .train.cli import add_train_commands

    return [add_data_commands, add_train_commands, add_eval_commands, add_tokenize_commands, add_experiment_commands]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
