"""Publishing a model directory on the Hugging Face hub: the repo folder (weights, config, card) and its upload.

::

    folder = assemble_repo("runs/shapes-tiny-stage2/last", "hub/", repo_id="user/qlip-shapes")   # nothing uploaded
    push_folder(folder, "user/qlip-shapes", private=True)                                        # huggingface_hub

A QLIP model directory gives ``config.json``, ``model.safetensors`` and its tokenizer files; a text-to-image
generator directory gives its own two files and its ``qlip/`` model. The folder gets a model card
(:mod:`qlip.model_card`), unless the model directory carries a README.md of its own, which is used as it is.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoints import CONFIG_NAME, MODEL_FILES, read_config
from .fileio import atomic_write, make_temp_dir, write_text_atomic
from .model_card import (
    CARD_NAME,
    DEFAULT_LICENSE,
    find_report,
    is_generated_card,
    model_card_for,
    read_report_metrics,
    render_generator_card,
    run_config_path,
)

log = logging.getLogger(__name__)

GENERATOR_FORMAT = "qlip-t2i"
GENERATOR_QLIP_SUBDIR = "qlip"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}


class HubError(Exception):
    """Something the user must change to publish: a bad repo id, an output folder in the way, offline, no access."""


@dataclass
class RepoFolder:
    """What :func:`assemble_repo` wrote."""

    path: Path
    files: list[str] = field(default_factory=list)  # relative paths, sorted
    kind: str = "qlip"  # "qlip" or "generator"
    card: str = "generated"  # "generated", or "kept" when the model directory's own README.md was copied


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or ".." in repo_id:
        raise HubError(f"--repo {repo_id!r} is not a hub repo id; write it as USER/NAME (letters, digits, '-', '_', "
                       f"'.'), e.g. alice/qlip-shapes")  # fmt: skip
    return repo_id


def directory_kind(model_dir: str | Path) -> str:
    """``"generator"`` for a text-to-image generator directory, ``"qlip"`` for a QLIP model directory.

    Raises:
        HubError: neither (no readable config.json of either kind).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise HubError(f"{model_dir} is not a directory; pass a model directory (e.g. runs/NAME/last)")
    try:
        config = json.loads((model_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HubError(f"{model_dir} has no readable {CONFIG_NAME} ({e}); pass a model directory written by qlip "
                       f"(save_pretrained, run_dir/last)") from None  # fmt: skip
    if isinstance(config, dict) and config.get("format") == GENERATOR_FORMAT:
        return "generator"
    try:
        read_config(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise HubError(f"{model_dir} is not a qlip model directory: {e}") from None
    return "qlip"


def _model_files(model_dir: Path) -> list[str]:
    present = [name for name in MODEL_FILES if (model_dir / name).is_file()]
    if "model.safetensors" not in present:
        raise HubError(f"{model_dir} has no model.safetensors; only safetensors weights are published")
    return present


def repo_files(model_dir: str | Path, kind: str) -> list[str]:
    """The files of ``model_dir`` that go into the repo (relative paths), its card aside."""
    model_dir = Path(model_dir)
    files = _model_files(model_dir)
    if kind == "generator":
        sub = model_dir / GENERATOR_QLIP_SUBDIR
        if not sub.is_dir():
            raise HubError(f"{model_dir} is a generator directory without its {GENERATOR_QLIP_SUBDIR}/ QLIP model")
        files += [f"{GENERATOR_QLIP_SUBDIR}/{name}" for name in _model_files(sub)]
    return sorted(files)


def render_card(model_dir: str | Path, kind: str, *, repo_id: str | None = None, report: str | Path | None = None,
                license: str = DEFAULT_LICENSE) -> str:  # fmt: skip
    """The generated card of ``model_dir`` as it would be published under ``repo_id``."""
    model_dir = Path(model_dir)
    if kind == "qlip":
        return model_card_for(model_dir, read_config(model_dir)[0], report=report, license=license, repo_id=repo_id)
    from .generation.model import read_generator_config

    report_path = find_report(model_dir, report)
    return render_generator_card(
        read_generator_config(model_dir), title=repo_id.split("/")[-1] if repo_id else model_dir.resolve().name,
        license=license, run_config=run_config_path(model_dir),
        metrics=read_report_metrics(report_path) if report_path else None,
        metrics_source=report_path.name if report_path else "report.json", repo_id=repo_id,
    )  # fmt: skip


def _check_out(out: Path, model_dir: Path) -> None:
    if not str(out).strip():
        raise HubError("--out is empty; name a new folder for the repo")
    if out.exists() and not out.is_dir():
        raise HubError(f"--out {out} is a file; name a new folder for the repo")
    if out.is_dir() and any(out.iterdir()):
        raise HubError(f"--out {out} exists and is not empty; name a new or empty folder (nothing in it is replaced)")
    resolved, source = out.resolve(), model_dir.resolve()
    if resolved == source or source in resolved.parents:
        raise HubError(f"--out {out} is inside the model directory {model_dir}; name a folder outside it")


def assemble_repo(model_dir: str | Path, out: str | Path, *, repo_id: str | None = None,
                  report: str | Path | None = None, license: str = DEFAULT_LICENSE) -> RepoFolder:  # fmt: skip
    """Write the repo folder of ``model_dir`` to ``out`` (new or empty): its model files and a model card.

    The folder is filled under a temporary name beside ``out`` and renamed into place when complete. Files are
    copied, never moved: the model directory is not changed.

    Raises:
        HubError: ``model_dir`` is not a model directory, ``out`` is in the way, or the repo id is malformed.
        ModelCardError: the report given is unreadable.
    """
    model_dir, out = Path(model_dir), Path(out)
    if repo_id is not None:
        check_repo_id(repo_id)
    kind = directory_kind(model_dir)
    files = repo_files(model_dir, kind)
    _check_out(out, model_dir)
    own_card = model_dir / CARD_NAME
    keep_card = own_card.is_file() and not is_generated_card(own_card)
    card = None if keep_card else render_card(model_dir, kind, repo_id=repo_id, report=report, license=license)
    stage = make_temp_dir(out.resolve().parent, f".{out.name}.qlip-hub-")
    try:
        for name in files:
            atomic_write(stage / name, lambda tmp, name=name: shutil.copyfile(model_dir / name, tmp))
        if keep_card:
            atomic_write(stage / CARD_NAME, lambda tmp: shutil.copyfile(own_card, tmp))
        else:
            write_text_atomic(stage / CARD_NAME, card)
        if out.is_dir():
            out.rmdir()  # empty (checked): rename would not replace it otherwise on every platform
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return RepoFolder(out, sorted([*files, CARD_NAME]), kind, "kept" if keep_card else "generated")


def hub_offline() -> bool:
    """Whether huggingface_hub is told to stay offline (``HF_HUB_OFFLINE``)."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in _OFFLINE_VALUES:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def check_can_push() -> None:
    """Raise :class:`HubError` when an upload cannot start: huggingface_hub missing, or offline mode."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise HubError('pushing to the hub needs huggingface_hub: pip install "qlip[hub]" (or use --dry-run --out '
                       "FOLDER to write the repo folder only)") from None  # fmt: skip
    if hub_offline():
        raise HubError("cannot push: the Hugging Face hub is offline here (HF_HUB_OFFLINE is set); unset it on "
                       "a machine with a network, or use --dry-run --out FOLDER to write the repo folder only")


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False,
                commit_message: str = "Upload a qlip model") -> str:  # fmt: skip
    """Create ``repo_id`` if needed and upload ``folder`` to it; returns the repo's URL.

    Raises:
        HubError: offline, no network, not logged in, or the hub refused (the hub's reason in one line).
    """
    check_repo_id(repo_id)
    check_can_push()
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    except (OSError, ValueError) as e:  # requests' and the hub's errors are OSErrors; a malformed id a ValueError
        reason = " ".join(str(e).split())[:300]
        raise HubError(f"could not push to {repo_id} on the Hugging Face hub ({type(e).__name__}: {reason}); check "
                       f"the network and `huggingface-cli login`, or use --dry-run --out FOLDER") from None  # fmt: skip
    return str(url)
