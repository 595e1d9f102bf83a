"""User-facing constructors: list_models / create_model / create_model_and_transforms / get_tokenizer.

``name_or_path`` may be:
* a registered name (``qlip models`` lists them): random initialization, for training;
* a directory in our format (``save_pretrained``) or laid out like a released Hugging Face repo;
* ``hf-hub:ORG/NAME``: downloaded through ``huggingface_hub`` when it is installed and the network is there.
Weights that were asked for are never silently replaced by random ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path

import torch

from .checkpoints import read_config, read_weights
from .config import HFTextConfig, QLIPConfig
from .models.qlip import QLIP
from .weights import IDENTITY, RELEASED_KEYS, LoadReport, load_into

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
PARTS = ("vision", "quantizer", "decoder", "text")


def _registry() -> dict[str, Path]:
    folder = resources.files("qlip") / "model_configs"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".json")}


def list_models() -> list[str]:
    """Names of the registered architectures."""
    return sorted(_registry(), key=lambda n: (n.lower().startswith("qlip-") and n[5].islower(), n))


def get_model_config(name: str) -> QLIPConfig:
    reg = _registry()
    if name not in reg:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return QLIPConfig.from_dict(json.loads(reg[name].read_text()))


def resolve_model_dir(name_or_path: str) -> Path | None:
    """Return the local directory for a path or ``hf-hub:`` id, or None for a registered name."""
    if name_or_path.startswith(HF_HUB_PREFIX):
        repo_id = name_or_path[len(HF_HUB_PREFIX) :]
        try:
            from huggingface_hub import snapshot_download
        except ImportError as e:
            raise RuntimeError(
                f"{name_or_path}: loading from the Hugging Face hub needs huggingface_hub (pip install 'qlip[hub]'), "
                "or download the repository yourself and pass its directory"
            ) from e
        try:
            path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt"])
        except Exception as e:  # offline, unknown repo, no network
            raise RuntimeError(
                f"could not fetch {repo_id} from the Hugging Face hub ({type(e).__name__}: {e}); if you are offline "
                "(HF_HUB_OFFLINE=1 or no network), download the repository elsewhere and pass its local directory"
            ) from e
        return Path(path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path in _registry():
        return None
    if path.exists():
        raise ValueError(f"{name_or_path} is a file; pass a model directory (config.json + model.safetensors)")
    raise ValueError(
        f"{name_or_path!r} is neither a model directory nor a registered model; registered: {', '.join(list_models())}"
    )


def _select_parts(cfg: QLIPConfig, parts: Iterable[str] | None) -> QLIPConfig:
    if parts is None:
        return cfg
    parts = set(parts)
    unknown = parts - set(PARTS)
    if unknown:
        raise ValueError(f"unknown model part(s) {sorted(unknown)}; choose from {PARTS}")
    missing = [p for p in parts if getattr(cfg, p) is None]
    if missing:
        raise ValueError(f"{cfg.name} has no {missing} part(s) to build")
    return cfg.replace(**{p: None for p in PARTS if p not in parts})


def create_model(
    name_or_path: str,
    *,
    parts: Iterable[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
) -> QLIP:
    """Build a QLIP model, loading weights when ``name_or_path`` is a directory or hub id.

    Args:
        name_or_path: registered name, model directory (ours or the released layout) or ``hf-hub:ORG/NAME``.
        parts: build only these parts, e.g. ``("vision", "quantizer", "decoder")`` for a tokenizer without the
            text tower, ``("vision",)`` for an understanding encoder, ``("quantizer", "decoder")`` to decode indices.
        device, dtype: where and in what precision to put the model (the quantizer always computes in float32).
        strict: raise on any unplaced key / unfilled parameter / shape mismatch (default).
    """
    directory = resolve_model_dir(name_or_path)
    if directory is None:
        cfg = _select_parts(get_model_config(name_or_path), parts)
        model = QLIP(cfg)
        log.info("built %s with random weights", cfg.name)
    else:
        cfg, released = read_config(directory)
        cfg = _select_parts(cfg, parts)
        model = QLIP(cfg)
        key_map = RELEASED_KEYS if released else IDENTITY
        report: LoadReport = load_into(model, read_weights(directory), key_map, strict=strict)
        model.load_report = report
        log.info("loaded %s from %s (%s layout)", cfg.name, directory, "released" if released else "qlip")
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def create_model_and_transforms(name_or_path: str, **kwargs) -> tuple[QLIP, Callable, Callable]:
    """Model plus its train-time and eval-time image transforms (PIL image -> normalized tensor)."""
    from .transforms import image_transform

    model = create_model(name_or_path, **kwargs)
    size = model.image_size
    return model, image_transform(size, train=True), image_transform(size, train=False)


def get_tokenizer(name_or_path: str, context_length: int | None = None, *, vocabulary: str | Path | None = None):
    """The text tokenizer of a model, padding to the model's text context.

    Args:
        name_or_path: a model directory (its vocab.json + merges.txt are used, or the tokenizer.json of a pretrained
            Hugging Face text tower), a registered name (with
            ``vocabulary``), an ``hf-hub:`` id, or a tokenizer directory alone (vocab.json + merges.txt without a
            model config, e.g. from ``qlip tokenizer train``), which pads to its own length.
        context_length: length of the rows; default the model's text context.
        vocabulary: a directory with vocab.json + merges.txt to use instead of the model's, e.g. a trained BPE.

    Raises:
        ValueError: a registered name without ``vocabulary``, or a vocabulary larger than the text tower's.
        FileNotFoundError: the vocabulary directory lacks vocab.json or merges.txt.
    """
    from .tokenizer import CLIPTokenizer

    directory = resolve_model_dir(name_or_path)
    if directory is None:
        cfg: QLIPConfig | None = get_model_config(name_or_path)
        if vocabulary is None:
            raise ValueError(
                f"{name_or_path} is a registered architecture without a vocabulary. Pass a model directory holding "
                "vocab.json + merges.txt (a released QLIP repo has them), or a vocabulary for your captions: train "
                "one with `qlip tokenizer train CAPTIONS --vocab-size N --out DIR` and pass vocabulary=DIR."
            )
    else:
        try:
            cfg = read_config(directory)[0]
        except (FileNotFoundError, ValueError):
            cfg = None  # a tokenizer directory alone
    if cfg is not None and isinstance(cfg.text, HFTextConfig):
        return _pretrained_tower_tokenizer(directory, cfg.text, context_length, vocabulary)
    vocab_dir = Path(vocabulary) if vocabulary is not None else directory
    tok = CLIPTokenizer.from_pretrained(vocab_dir)
    if cfg is not None and cfg.text is not None:
        size = len(tok.get_vocab())
        if size > cfg.text.vocab_size:
            raise ValueError(
                f"the vocabulary in {vocab_dir} has {size} tokens but the text tower of {cfg.name} only "
                f"{cfg.text.vocab_size}: use the model's own vocabulary or train a smaller one (--vocab-size)"
            )
        tok.context_length = cfg.text.context_length
    if context_length is not None:
        tok.context_length = context_length
    return tok


def _pretrained_tower_tokenizer(directory: Path, text: HFTextConfig, context_length: int | None,
                                vocabulary: str | Path | None):  # fmt: skip
    """The tokenizer.json a model with a pretrained Hugging Face text tower carries (its own, never another)."""
    from .hf.tokenizer_json import TOKENIZER_JSON, JSONTokenizer

    if vocabulary is not None:
        raise ValueError(f"{directory} has a pretrained {text.model_type} text tower, which only reads its own "
                         f"tokenizer ({TOKENIZER_JSON} in the model directory); drop the other vocabulary")
    tok = JSONTokenizer.from_file(directory / TOKENIZER_JSON, pad_token_id=text.pad_token_id,
                                  context_length=text.context_length)  # fmt: skip
    if tok.vocab_size > text.vocab_size:
        raise ValueError(f"the tokenizer in {directory} has {tok.vocab_size} tokens but the text tower only "
                         f"{text.vocab_size}: the tokenizer.json is not the one the model was trained with")
    if context_length is not None:
        tok.context_length = context_length
    return tok
