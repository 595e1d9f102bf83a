"""``qlip models | encode | decode | reconstruct``: the tokenizer itself, image files in, token files / PNGs out."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from .common import (
    EXIT_BAD_DATA,
    CLIError,
    add_image_options,
    add_model_options,
    add_runtime_option,
    autocast,
    check_output_dir,
    check_output_file,
    expand_images,
    image_transform_for,
    load_batches,
    load_model,
    plan_outputs,
    report_bad,
    resolve_device,
    save_pngs,
)

log = logging.getLogger("qlip")


def cmd_models(args: argparse.Namespace) -> int:
    from ..factory import get_model_config, list_models
    from ..models.qlip import QLIP

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
    from ..tokenfile import TokenSpec, write_token_file

    inputs = expand_images(args.images)
    files = [f for f, _ in inputs]
    out = check_output_file(args.out, files, overwrite=args.overwrite)
    device = resolve_device(args.device)
    model = load_model(args.model, device, parts=("vision", "quantizer"))
    encoder = model
    if device.type == "cpu":  # the exact float32 tokens, by the fastest runtime installed (see --runtime)
        from ..inference import optimize_for_inference

        try:
            encoder = optimize_for_inference(model, mode="fp32", runtime=args.runtime, expected_images=len(files))
        except ValueError as e:
            raise CLIError(str(e)) from e
        log.info("encoding with %s", encoder.plan)
    elif args.runtime == "onnxruntime":
        raise CLIError(f"--runtime onnxruntime runs on the CPU only, not on {device}; use --device cpu or "
                       "--runtime torch")  # fmt: skip
    transform = image_transform_for(args, model.image_size)
    tokens, keys, bad = [], [], []
    with torch.inference_mode(), autocast(device):
        for good, batch, errors in load_batches(files, transform, args.batch_size, not args.quiet):
            bad.extend(errors)
            if batch is None:
                continue
            tokens.append(encoder.encode(batch.to(device), output=args.output).cpu())
            keys.extend(inputs[i][1].as_posix() for i in good)
    report_bad(bad)
    if not tokens:
        print(f"error: none of the {len(files)} input image(s) could be read; nothing written", file=sys.stderr)
        return EXIT_BAD_DATA
    tensor = torch.cat(tokens)
    write_token_file(out, tensor, TokenSpec.of(model), kind=args.output, keys=keys)
    print(f"wrote {out}: {args.output} {tuple(tensor.shape)} for {len(keys)} image(s) ({model.num_bits} bits per "
          f"token){f'; {len(bad)} unreadable image(s) skipped' if bad else ''}")  # fmt: skip
    return EXIT_BAD_DATA if bad else 0


def _safe_relative(key: str, index: int) -> Path:
    """A sample key as a relative output name; keys that would leave the output folder become ``image_NNNNN``."""
    p = Path(key)
    if not key or p.is_absolute() or ".." in p.parts or key.startswith("~"):
        return Path(f"image_{index:05d}")
    return p


def cmd_decode(args: argparse.Namespace) -> int:
    from ..tokenfile import TokenFileError, iter_token_files, token_file_paths

    try:
        paths = token_file_paths(args.tokens)
    except TokenFileError as e:
        raise CLIError(str(e)) from e
    out_dir = check_output_dir(args.out)
    device = resolve_device(args.device)
    model = load_model(args.model, device, parts=("quantizer", "decoder"))
    written, offset = [], 0
    try:
        for tf in iter_token_files(args.tokens):
            tf.spec.check(model, source=str(tf.path))
            if tf.spec.model != model.cfg.name:
                log.warning("tokens were made by %s, decoding with %s", tf.spec.model, model.cfg.name)
            names = [_safe_relative(k, offset + i) for i, k in enumerate(tf.keys)]
            outputs = plan_outputs(names, out_dir, ".png", args.overwrite)
            for start in range(0, len(tf), args.batch_size):
                chunk = tf.tokens[start : start + args.batch_size].to(device)
                with torch.inference_mode(), autocast(device):
                    try:
                        images = model.decode(chunk, kind=tf.kind, group_size=tf.spec.group_size)
                    except (ValueError, TypeError) as e:
                        raise CLIError(f"{tf.path}: {e}") from e
                written += save_pngs(images, outputs[start : start + args.batch_size])
            offset += len(tf)
    except TokenFileError as e:
        raise CLIError(str(e)) from e
    print(f"wrote {len(written)} image(s) to {out_dir} from {len(paths)} token file(s)")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from ..eval.metrics import psnr
    from ..transforms import to_uint8

    inputs = expand_images(args.images)
    files = [f for f, _ in inputs]
    out_dir = check_output_dir(args.out, [Path(p) for p in args.images])
    names = [rel for _, rel in inputs]
    outputs = plan_outputs(names, out_dir, ".png", args.overwrite)
    if args.save_inputs:
        input_outputs = plan_outputs(names, out_dir / "inputs", ".png", args.overwrite)
    resolved_inputs = {f.resolve() for f in files}
    if any(p.resolve() in resolved_inputs for p in outputs):
        raise CLIError(f"--out {out_dir} would overwrite input images; choose another folder")
    device = resolve_device(args.device)
    model = load_model(args.model, device, parts=("vision", "quantizer", "decoder"))
    transform = image_transform_for(args, model.image_size)
    bad, values = [], []
    with torch.inference_mode(), autocast(device):
        for good, batch, errors in load_batches(files, transform, args.batch_size, not args.quiet):
            bad.extend(errors)
            if batch is None:
                continue
            recon = model.reconstruct(batch.to(device)).float().cpu()
            scores = psnr(to_uint8(batch), to_uint8(recon))
            save_pngs(recon, [outputs[i] for i in good])
            if args.save_inputs:
                save_pngs(batch, [input_outputs[i] for i in good])
            for i, s in zip(good, scores.tolist()):
                values.append(s)
                print(f"{files[i]}\tPSNR {s:.2f} dB")
    report_bad(bad)
    if not values:
        print(f"error: none of the {len(files)} input image(s) could be read; nothing written", file=sys.stderr)
        return EXIT_BAD_DATA
    print(f"mean PSNR {sum(values) / len(values):.2f} dB over {len(values)} image(s); PNGs in {out_dir}"
          f"{f'; {len(bad)} unreadable image(s) skipped' if bad else ''}")  # fmt: skip
    return EXIT_BAD_DATA if bad else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered architectures")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("encode", help="images -> BSQ token file (safetensors)")
    p.add_argument("images", nargs="+", help="image files or directories")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--output", choices=("indices", "bits", "group_indices"), default="indices")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_runtime_option(p)
    add_model_options(p)
    add_image_options(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="token file (or a `qlip tokenize` folder) -> PNG images")
    p.add_argument("tokens", help="a token file from `qlip encode`, or an output folder of `qlip tokenize`")
    p.add_argument("--out", required=True, help="output directory (mirrors the names the tokens were made from)")
    p.add_argument("--overwrite", action="store_true", help="replace existing PNGs in --out")
    add_model_options(p)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("reconstruct", help="images -> tokens -> images; writes PNGs and prints PSNR")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True, help="output directory (mirrors the inputs' relative paths)")
    p.add_argument("--save-inputs", action="store_true", help="also write the preprocessed inputs to OUT/inputs/")
    p.add_argument("--overwrite", action="store_true", help="replace existing PNGs in --out")
    add_model_options(p)
    add_image_options(p)
    p.set_defaults(func=cmd_reconstruct)



