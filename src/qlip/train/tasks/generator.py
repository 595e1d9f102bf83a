"""The text-to-image generator as a task of the one training loop (``task: generator``).

It models the tokens that ``qlip tokenize`` wrote (indices + captions) with :class:`qlip.generation.T2IModel`,
conditioned on the frozen text tower of the QLIP model that made them; the image encoder never runs in training.
The export, ``run_dir/last``, is a self-contained generator directory (:func:`qlip.generation.save_generator`):
``qlip generate "a red circle" --model run_dir/last``.

Config (``generator:`` section, see :class:`GeneratorOptions`)::

    task: generator
    generator: {tokenizer: runs/shapes-tiny-stage2/last, tokens: data/shapes-tok, width: 256, depth: 4, heads: 4}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, TrainConfig
from .base import StepLosses, Task, check_tokenizer_dir

log = logging.getLogger(__name__)

CODECS = ("subtoken", "depth", "bits")


@dataclass
class GeneratorOptions:
    """The ``generator:`` section.

    Attributes:
        tokenizer: the QLIP model directory whose tokens are modelled (its text tower conditions the generator, its
            decoder turns samples into pixels; both are copied into the exported generator directory).
        tokens: a ``qlip tokenize`` output folder made with that model (indices and captions).
        width, depth, heads: the autoregressive core.
        qk_norm: RMS-normalize queries and keys (stabler at large sizes).
        codec: how a d-bit token becomes AR steps: "subtoken" (``parts`` sub-tokens per position), "depth" (a
            small depth head predicts the sub-tokens of a position in turn), "bits" (d binary logits per position).
        parts: sub-tokens per position for "subtoken" / "depth".
        caption_dropout: probability of replacing a caption by the learned null condition (for CFG).
        eval_prompts: captions sampled at each held-out check (the picture shows them; 0 = no samples).
        eval_cfg_scale: guidance scale of those samples.
        text_encoder: the captions' frozen encoder: "qlip" (the tokenizer's own text tower) or "hf:<source>", a
            Hugging Face text encoder read from local files ("hf:minilm", "hf:/path/to/flan-t5-xl"); the exported
            generator names it and loads it again from there.
    """

    tokenizer: str = ""
    tokens: str = ""
    width: int = 256
    depth: int = 4
    heads: int = 4
    qk_norm: bool = False
    codec: str = "subtoken"
    parts: int = 2
    caption_dropout: float = 0.1
    eval_prompts: int = 16
    eval_cfg_scale: float = 3.0
    text_encoder: str = "qlip"

    def validate(self, cfg: TrainConfig) -> None:
        if not self.tokenizer:
            raise ConfigError("generator.tokenizer is not set: name the QLIP model directory whose tokens the "
                              "generator models, e.g. generator.tokenizer=runs/shapes-tiny-stage2/last")  # fmt: skip
        if not self.tokens:
            raise ConfigError("generator.tokens is not set: name a `qlip tokenize` output folder made with that model, "
                              "e.g. generator.tokens=data/shapes-tok")  # fmt: skip
        if self.codec not in CODECS:
            raise ConfigError(f"generator.codec={self.codec!r} is not one of {list(CODECS)}")
        for key in ("width", "depth", "heads", "parts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"generator.{key} must be >= 1, got {getattr(self, key)}")
        if self.width % self.heads:
            raise ConfigError(f"generator.width={self.width} must be a multiple of generator.heads={self.heads}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"generator.caption_dropout must lie in [0, 1), got {self.caption_dropout}")
        if self.eval_prompts < 0 or self.eval_cfg_scale < 0:
            raise ConfigError("generator.eval_prompts and generator.eval_cfg_scale must be >= 0")
        from ...generation.conditioning import hf_encoder_source

        try:
            hf_encoder_source(self.text_encoder)
        except ValueError as e:
            raise ConfigError(f"generator.text_encoder: {e}") from None


class TokenBatches:
    """Batches of (tokens, captions) from token files, reshuffled every epoch; this rank's share; resumable.

    The files are read into memory once (a 64-token image is 512 bytes as int64: a million images is 0.5 GB).
    Batch ``n`` depends on (seed, epoch, position) only, so a resumed run sees the same batches.
    """

    def __init__(self, tokens: torch.Tensor, captions: list[str], batch_size: int, seed: int, rank: int,
                 world_size: int) -> None:  # fmt: skip
        self.tokens, self.captions = tokens, captions
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        self.epoch = self.position = 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.captions), generator=g)
        return order[self.rank :: self.world]

    def __iter__(self) -> TokenBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.position + self.batch_size > len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order()
        idx = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return {"tokens": self.tokens[idx], "captions": [self.captions[int(i)] for i in idx]}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order()


def read_token_folder(path: str | Path) -> tuple[torch.Tensor, list[str], Any]:
    """(indices (N, h, w) int64, captions, spec) of every sample with a caption in a token file or folder."""
    from ...tokenfile import TokenFileError, iter_token_files

    tokens, captions, spec, missing = [], [], None, 0
    try:
        for tf in iter_token_files(path):
            if spec is None:
                spec = tf.spec
            elif (tf.spec.grid, tf.spec.bits, tf.spec.fingerprint) != (spec.grid, spec.bits, spec.fingerprint):
                raise ConfigError(f"{tf.path} holds tokens of another tokenizer than the folder's first file")
            keep = [i for i, c in enumerate(tf.captions) if c]
            missing += len(tf) - len(keep)
            tokens.append(tf.indices[keep])
            captions.extend(tf.captions[i] for i in keep)
    except TokenFileError as e:
        raise ConfigError(f"generator.tokens={path}: {e}") from e
    if not captions:
        raise ConfigError(f"generator.tokens={path} holds no sample with a caption; tokenize a source with captions "
                          "(shapes, caption lists, shards) or pass --caption-template for class folders")  # fmt: skip
    if missing:
        log.warning("%s: %d sample(s) without a caption are left out", path, missing)
    return torch.cat(tokens), captions, spec


class GeneratorTask(Task):
    """Text-to-image over QLIP tokens: LlamaGen's recipe with the tokenizer's own text tower as the condition."""

    section = "generator"
    section_class = GeneratorOptions
    progress_unit = "img/s"

    @classmethod
    def check_startup(cls, cfg: TrainConfig) -> None:
        opts = cfg.task_options
        check_tokenizer_dir(opts.tokenizer, "generator.tokenizer")
        if not Path(opts.tokens).exists():
            raise ConfigError(f"generator.tokens={opts.tokens}: no such token folder; make it with `qlip tokenize "
                              f"--model {opts.tokenizer} --data SOURCE --out {opts.tokens}`")  # fmt: skip

    @classmethod
    def check_export_target(cls, out_dir: Path) -> None:
        from ...generation.model import check_generator_target

        check_generator_target(out_dir, overwrite=False)

    # --- building ---------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from ...factory import create_model, get_tokenizer
        from ...generation import CodecConfig, T2IConfig, T2IModel, check_token_spec
        from ...tokenfile import TokenSpec

        opts = self.options
        # The whole model (the image encoder too): the exported generator directory carries it, so that its
        # evaluation can reconstruct real images (the judge's ceiling) and score samples against captions.
        self.qlip = create_model(opts.tokenizer, device=self.rt.device)
        self.qlip.requires_grad_(False).eval()
        self.qlip_tokenizer = get_tokenizer(opts.tokenizer)
        self.text_model, self.text_tokenizer, encoder = self._text_encoder()
        self.tokens, self.captions, spec = read_token_folder(opts.tokens)
        codec = CodecConfig(kind=opts.codec, parts=opts.parts if opts.codec != "bits" else 1)
        cfg = T2IConfig.for_tokenizer(TokenSpec.of(self.qlip), text=self.text_model.cfg, width=opts.width,
                                      depth=opts.depth, heads=opts.heads, codec=codec, dropout=opts.caption_dropout,
                                      encoder=encoder, qk_norm=opts.qk_norm)  # fmt: skip
        try:
            check_token_spec(cfg, spec, what=f"the token folder {opts.tokens}")
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self.t2i_cfg = cfg
        self.inputs = self._inputs_digest()
        log.info("generator: %d training images with captions from %s", len(self.captions), opts.tokens)
        return T2IModel(cfg, text_encoder=self.text_model).to(self.rt.device)

    def _inputs_digest(self) -> dict[str, str]:
        """sha256 of what the generator learns from: the tokenizer's weights and the tokens with their captions."""
        import hashlib

        from ...fileio import sha256_file

        weights = sorted(Path(self.options.tokenizer).glob("*.safetensors"))
        tokens = hashlib.sha256(self.tokens.numpy().tobytes())
        tokens.update("\n".join(self.captions).encode())
        return {"tokenizer": ",".join(sha256_file(w) for w in weights), "tokens": tokens.hexdigest()}

    def state_dict(self) -> dict[str, Any]:
        return {"generator_inputs": self.inputs}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to continue a run over another tokenizer or other tokens than it was trained on (a folder
        replaced under the same path), which would mix two token vocabularies in one model."""
        saved = checkpoint.get("generator_inputs")
        if saved is None or saved == self.inputs:
            return
        names = {"tokenizer": "tokenizer weights", "tokens": "tokens"}
        what = " and ".join(names[k] for k in names if saved.get(k) != self.inputs[k])
        raise ConfigError(f"{self.cfg.run_dir} holds checkpoints trained over other {what} than "
                          f"generator.tokenizer={self.options.tokenizer} / generator.tokens={self.options.tokens} "
                          "now hold; train it in a new run_dir")  # fmt: skip

    def _text_encoder(self) -> tuple[nn.Module, Any, str]:
        """(frozen text tower, its caption tokenizer, the ``conditioning.encoder`` the export records)."""
        from ...generation.conditioning import HF_ENCODER_PREFIX, hf_encoder_source
        from ...hf import HFModelError, load_text_encoder

        source = hf_encoder_source(self.options.text_encoder)
        if source is None:
            return self.qlip.text, self.qlip_tokenizer, self.options.text_encoder
        if Path(source).expanduser().exists():  # a folder: recorded absolute, so the export loads from anywhere
            source = str(Path(source).expanduser().resolve())
        try:
            encoder = load_text_encoder(source, device=self.rt.device)
        except HFModelError as e:
            raise ConfigError(f"generator.text_encoder={self.options.text_encoder}: {e}") from None
        log.info("generator: captions encoded by %s (width %d, %d tokens)", source, encoder.width,
                 encoder.context_length)  # fmt: skip
        return encoder, encoder.tokenizer, HF_ENCODER_PREFIX + source

    def batches(self) -> TokenBatches:
        return TokenBatches(self.tokens, self.captions, self.cfg.data.batch_size, self.cfg.seed, self.rt.rank,
                            self.rt.world_size)  # fmt: skip

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        return list(model.core.blocks) if hasattr(model.core, "blocks") else []

    def train_mode(self, model: nn.Module) -> None:
        model.train()  # the frozen text tower keeps itself in eval mode

    # --- one step -----------------------------------------------------------------------------------------------
    def losses(self, model: nn.Module, batch: Any, step: int) -> StepLosses:
        tokens = batch["tokens"].to(self.rt.device, non_blocking=True)
        text = self.text_tokenizer(batch["captions"]).to(self.rt.device, non_blocking=True)
        out = model(tokens, text)
        return StepLosses(terms={"image_tokens": out["loss"]}, total=out["loss"], samples=tokens.shape[0],
                          outputs=out)  # fmt: skip

    def log_metrics(self, last: StepLosses) -> dict[str, float]:
        out = last.outputs or {}
        return {f"gen/{k}": float(v) for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.ndim == 0}

    # --- evaluation and export ------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, *, name: str) -> dict[str, Any]:
        """Samples for the first ``eval_prompts`` training captions, written as a picture (top: the tokenizer's
        decoding of the real tokens, bottom: samples); ShapesEval runs on held-out captions in ``qlip eval``."""
        n = min(self.options.eval_prompts, len(self.captions))
        if n == 0:
            return {}
        from ...transforms import to_uint8
        from ..evaluate import save_grid

        model.eval()
        text = self.text_tokenizer(self.captions[:n]).to(self.rt.device)
        with torch.no_grad():
            sampled = model.generate(text, cfg_scale=self.options.eval_cfg_scale, seed=0)
            real = self.qlip.decode(self.tokens[:n].to(self.rt.device))
            fake = self.qlip.decode(sampled)
        save_grid(to_uint8(real.float().cpu()), to_uint8(fake.float().cpu()), self.grid_path(name))
        return {"num_eval": n}

    def export_model(self, state: dict[str, torch.Tensor]) -> nn.Module:
        from ...generation import T2IModel

        self.qlip.to("cpu")  # the export is the run's last act: the generator directory is written from the CPU
        model = T2IModel(self.t2i_cfg, text_encoder=self.text_model.to("cpu"))
        model.load_state_dict(state)
        return model

    def save_export(self, model: nn.Module, out_dir: Path) -> Path:
        from ...generation import save_generator

        return save_generator(out_dir, model, self.qlip, self.qlip_tokenizer)
