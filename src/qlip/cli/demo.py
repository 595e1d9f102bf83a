"""``qlip demo --model M [--generator G] [--vlm V] [--port 7860] [--share no]``: a local web page (Gradio)."""

from __future__ import annotations

import argparse

from .common import CLIError, positive_int, resolve_device


def _yes_no(text: str) -> bool:
    value = text.strip().lower()
    if value in ("yes", "y", "true", "1"):
        return True
    if value in ("no", "n", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")


def _port(text: str) -> int:
    port = positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {port}")
    return port


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo.app import GradioMissingError, build_app, import_gradio
    from ..demo.session import DemoSetupError

    try:
        import_gradio()  # before loading any model: without Gradio nothing else matters
    except GradioMissingError as e:
        raise CLIError(str(e)) from None
    device = resolve_device(args.device)
    try:
        app = build_app(args.model, args.generator, args.vlm, device=device)
    except DemoSetupError as e:
        raise CLIError(str(e)) from None
    print(f"qlip demo: http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
    try:
        app.launch(server_name=args.host, server_port=args.port, share=args.share, inbrowser=False, quiet=True)
    except OSError as e:  # the port is taken
        raise CLIError(f"cannot serve on {args.host}:{args.port} ({e}); choose another --port") from None
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a local web page: tokenize, classify, generate and chat (needs qlip[demo])")
    p.add_argument("--model", required=True, help="the QLIP model directory (with a decoder), e.g. run_dir/last")
    p.add_argument("--generator", default=None, metavar="DIR", help="a text-to-image generator directory (Generate)")
    p.add_argument("--vlm", default=None, metavar="DIR", help="a vision-language model directory (Chat)")
    p.add_argument("--port", type=_port, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--share", type=_yes_no, default=False, metavar="{yes,no}",
                   help="also open a public Gradio share link (needs a network; default no)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=cmd_demo)
