"""``qlip hub push DIR --repo USER/NAME [--dry-run --out FOLDER] [--private]`` and ``qlip hub card DIR``."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .common import CLIError


def _license(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"expected a license id such as apache-2.0 or mit, got {text!r}")
    return text


def cmd_push(args: argparse.Namespace) -> int:
    from ..hub import HubError, assemble_repo, check_can_push, check_repo_id, push_folder
    from ..model_card import ModelCardError

    if args.dry_run and args.out is None:
        raise CLIError("--dry-run writes the repo folder only: name it with --out FOLDER")
    try:
        check_repo_id(args.repo)
        if not args.dry_run:
            check_can_push()  # before any file is written: offline or without huggingface_hub nothing can happen
        with tempfile.TemporaryDirectory(prefix="qlip-hub-") as tmp:
            out = Path(args.out) if args.out is not None else Path(tmp) / "repo"
            folder = assemble_repo(args.model_dir, out, repo_id=args.repo, report=args.report, license=args.license)
            card = "the model directory's own README.md" if folder.card == "kept" else "a generated model card"
            if args.out is not None:
                print(f"wrote {folder.path}: {len(folder.files)} files ({', '.join(folder.files)}), with {card}")
            if args.dry_run:
                print(f"dry run: nothing uploaded; to publish: qlip hub push {args.model_dir} --repo {args.repo}")
                return 0
            url = push_folder(folder.path, args.repo, private=args.private)
    except (HubError, ModelCardError) as e:
        raise CLIError(str(e)) from None
    print(f"pushed {args.model_dir} to {url}{' (private)' if args.private else ''}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from ..hub import HubError, directory_kind, render_card
    from ..model_card import CARD_NAME, ModelCardError, write_card

    try:
        kind = directory_kind(args.model_dir)
        text = render_card(args.model_dir, kind, repo_id=args.repo, report=args.report, license=args.license)
        path = write_card(Path(args.model_dir) / CARD_NAME, text)
    except (HubError, ModelCardError) as e:
        raise CLIError(str(e)) from None
    print(f"wrote {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hub", help="publish a model directory on the Hugging Face hub, with a model card")
    hub = p.add_subparsers(dest="hub_command", required=True, metavar="SUBCOMMAND")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("model_dir", help="a model directory (run_dir/last) or a text-to-image generator directory")
        q.add_argument("--report", default=None, metavar="JSON",
                       help="a qlip eval report.json whose numbers the card shows (default: MODEL_DIR/report.json)")
        q.add_argument("--license", type=_license, default="apache-2.0", help="license id for the card")

    q = hub.add_parser("push", help="assemble the repo folder (weights, config, card) and upload it")
    common(q)
    q.add_argument("--repo", required=True, help="the hub repo, USER/NAME")
    q.add_argument("--dry-run", action="store_true", help="write the folder (--out) and upload nothing")
    q.add_argument("--out", default=None, metavar="FOLDER", help="where to write the repo folder (new or empty)")
    q.add_argument("--private", action="store_true", help="create the repo private")
    q.set_defaults(func=cmd_push)

    q = hub.add_parser("card", help="write or refresh MODEL_DIR/README.md (never one qlip did not write)")
    common(q)
    q.add_argument("--repo", default=None, help="the hub repo USER/NAME the card's loading snippet names")
    q.set_defaults(func=cmd_card)
