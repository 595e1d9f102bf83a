"""The text language model (``task: lm``) and the unified model (``task: unified``) as tasks of the one loop.

``task: lm`` pretrains the package's AR decoder (with QK-norm) on an English text corpus (by default the docstrings
of Python's standard library, :mod:`qlip.unified.corpus`) with a small CLIP-style BPE trained on it; the export is
a language-model directory (``qlip complete --model run_dir/last "prompt"``).

``task: unified`` starts from such a directory, extends its vocabulary with the visual sub-tokens of a QLIP
tokenizer and trains on mixed batches of text-only, image->text and text->image sequences
(:mod:`qlip.unified.mixing`); the export is a unified-model directory that carries the QLIP tokenizer.

Config::

    task: lm
    lm: {corpus: stdlib-docstrings, vocab_size: 4096, seq_len: 128, width: 256, depth: 4, heads: 4}

    task: unified
    unified: {init: runs/lm-text/last, tokenizer: runs/shapes-tiny-stage2/last, tokens: data/shapes-tok}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, TrainConfig
from .base import StepLosses, Task, check_tokenizer_dir

log = logging.getLogger(__name__)


@dataclass
class LMOptions:
    """The ``lm:`` section.

    Attributes:
        corpus: "stdlib-docstrings" (Python's own docstrings) or the path of a UTF-8 text file (documents separated
            by blank lines).
        held_out: share of the corpus's documents kept out of training for perplexity.
        tokenizer: a `qlip tokenizer train` folder; empty: train a BPE of ``vocab_size`` on the training split.
        vocab_size: size of that BPE.
        seq_len: tokens per training window; the model's context is ``context`` (>= seq_len + 1).
        context: the longest sequence the model reads (a unified model's image rows must fit in it).
        width, depth, heads, qk_norm: the decoder (QK-norm as in UM3's decoder).
        eval_windows: held-out windows of seq_len + 1 tokens scored at each evaluation.
    """

    corpus: str = "stdlib-docstrings"
    held_out: float = 0.05
    tokenizer: str = ""
    vocab_size: int = 4096
    seq_len: int = 128
    context: int = 256
    width: int = 256
    depth: int = 4
    heads: int = 4
    qk_norm: bool = True
    eval_windows: int = 64

    def validate(self, cfg: TrainConfig) -> None:
        for key in ("vocab_size", "seq_len", "width", "depth", "heads", "eval_windows"):
            if getattr(self, key) < 1:
                raise ConfigError(f"lm.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 < self.held_out < 1.0:
            raise ConfigError(f"lm.held_out must lie in (0, 1), got {self.held_out}")
        if self.context < self.seq_len + 1:
            raise ConfigError(f"lm.context={self.context} must be >= lm.seq_len + 1 = {self.seq_len + 1}")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ConfigError(f"lm.width={self.width} must split into lm.heads={self.heads} heads of an even size")


@dataclass
class UnifiedOptions:
    """The ``unified:`` section.

    Attributes:
        init: a language-model directory (run_dir/last of a ``task: lm`` run): the decoder and text tokenizer.
        tokenizer: the QLIP model directory whose tokens are modelled (carried into the export).
        tokens: a ``qlip tokenize`` folder made with it (indices + captions).
        parts: visual sub-tokens per image token (the subtoken codec's split).
        start, end: row ratios (text, image->text, text->image) at step 0 and from ``horizon`` on (linear between).
        horizon: steps of the text share's decay; schedule: False uses ``end`` from the first step.
        caption_dropout: probability of dropping a text->image row's caption (the unconditional branch of CFG).
        eval_windows: held-out text windows scored at each evaluation; eval_images: training images captioned
            and captions sampled into a picture at each evaluation (0: none); eval_cfg_scale: their guidance.
        loss_weighting: "tokens" averages the loss over every target token of the batch, so a text->image row
            (128 targets at the demo size) outweighs an image->text row (its caption, ~15) eight to one; "rows"
            averages each row over its own targets first, so the row ratios alone set each task's share.
        visual_bits: add to each visual id's embedding and output row a learnt linear map of its sub-code's bits
            as +-1 (starting at zero; :mod:`qlip.unified.model`), so codes that share bits share representation.
        visual_positions: add to each visual id's embedding a learnt vector of its slot in the image (starting at
            zero), so a token says where in the grid it is (RoPE gives attention the offsets only).
    """

    init: str = ""
    tokenizer: str = ""
    tokens: str = ""
    parts: int = 2
    start: list[float] = field(default_factory=lambda: [60.0, 1.0, 3.0])
    end: list[float] = field(default_factory=lambda: [12.0, 1.0, 3.0])
    horizon: int = 10_000
    schedule: bool = True
    caption_dropout: float = 0.1
    eval_windows: int = 64
    eval_images: int = 8
    eval_cfg_scale: float = 3.0
    loss_weighting: str = "tokens"
    visual_bits: bool = False
    visual_positions: bool = False

    def schedule_object(self) -> Any:
        from ...unified.mixing import MixSchedule

        return MixSchedule(tuple(self.start), tuple(self.end), self.horizon, self.schedule)

    def validate(self, cfg: TrainConfig) -> None:
        for key, what in (("init", "a language-model directory (run_dir/last of a task: lm run)"),
                          ("tokenizer", "the QLIP model directory whose tokens are modelled"),
                          ("tokens", "a `qlip tokenize` folder made with that model")):  # fmt: skip
            if not getattr(self, key):
                raise ConfigError(f"unified.{key} is not set: name {what}")
        try:
            self.schedule_object()
        except ValueError as e:
            raise ConfigError(f"unified: {e}") from None
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"unified.caption_dropout must lie in [0, 1), got {self.caption_dropout}")
        from ...unified.model import LOSS_WEIGHTINGS

        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"unified.loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got "
                              f"{self.loss_weighting!r}")  # fmt: skip
        if self.parts < 1 or self.eval_windows < 1 or self.eval_images < 0 or self.eval_cfg_scale < 0:
            raise ConfigError("unified.parts and unified.eval_windows must be >= 1, unified.eval_images and "
                              "unified.eval_cfg_scale >= 0")  # fmt: skip


class _SequenceTask(Task):
    """What the language model and the unified model share: one split-softmax loss over mixed rows."""

    progress_unit = "seq/s"
    loss_weighting = "tokens"  # how losses() averages; the unified task takes unified.loss_weighting

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        return list(model.core.blocks)

    def losses(self, model: nn.Module, batch: Any, step: int) -> StepLosses:
        from ...unified.model import KINDS, reduce_nll

        ids = batch["ids"].to(self.rt.device, non_blocking=True)
        mask = batch["mask"].to(self.rt.device, non_blocking=True)
        nll = model(ids[:, :-1], ids[:, 1:], mask)  # (B, T-1), split softmax, 0 outside the mask
        total = reduce_nll(nll, mask, self.loss_weighting)
        per_kind = {}
        with torch.no_grad():
            kind = batch["kind"].to(self.rt.device)
            for k, name in enumerate(KINDS):
                rows = kind == k
                n = mask[rows].sum()
                if int(n):
                    per_kind[name] = (nll[rows].sum() / n).detach()
        return StepLosses(terms={"tokens": total}, total=total, samples=ids.shape[0], outputs=per_kind)

    def log_metrics(self, last: StepLosses) -> dict[str, float]:
        return {f"nll/{k}": float(v) for k, v in (last.outputs or {}).items()}

    def text_perplexity(self, model: nn.Module, windows: int) -> float:
        from ...unified.text import perplexity

        return perplexity(model, self.held_out_stream, self.seq_len + 1, max_windows=windows)

    def export_model(self, state: dict[str, torch.Tensor]) -> nn.Module:
        from ...unified.model import UnifiedLM

        model = UnifiedLM(self.model_cfg)
        model.load_state_dict(state)
        return model

    @classmethod
    def check_export_target(cls, out_dir: Path) -> None:
        from ...unified.pipeline import check_unified_target

        try:
            check_unified_target(out_dir)
        except ValueError as e:
            raise ConfigError(str(e)) from None


class LMTask(_SequenceTask):
    """A text language model on an English corpus (the initialization of the unified model)."""

    section = "lm"
    section_class = LMOptions

    @classmethod
    def check_startup(cls, cfg: TrainConfig) -> None:
        from ...unified.corpus import CORPORA

        opts = cfg.task_options
        if opts.corpus not in CORPORA and not Path(opts.corpus).is_file():
            raise ConfigError(f"lm.corpus={opts.corpus}: neither a known corpus ({', '.join(CORPORA)}) nor a text "
                              "file")  # fmt: skip
        if opts.tokenizer and not (Path(opts.tokenizer) / "vocab.json").is_file():
            raise ConfigError(f"lm.tokenizer={opts.tokenizer}: no vocab.json + merges.txt there; give a `qlip "
                              "tokenizer train` folder, or leave it empty to train one on the corpus")  # fmt: skip

    def build_model(self) -> nn.Module:
        from ...tokenizer import get_tokenizer_from_dir, train_bpe
        from ...unified.corpus import load_corpus
        from ...unified.model import UnifiedLM, text_config
        from ...unified.text import token_stream

        opts = self.options
        try:
            corpus = load_corpus(opts.corpus, opts.held_out)
        except ValueError as e:
            raise ConfigError(f"lm.corpus: {e}") from None
        if opts.tokenizer:
            self.tokenizer = get_tokenizer_from_dir(opts.tokenizer)
        else:
            self.tokenizer = train_bpe(corpus.train, opts.vocab_size)
        self.seq_len = opts.seq_len
        self.stream = token_stream(self.tokenizer, corpus.train)
        self.held_out_stream = token_stream(self.tokenizer, corpus.held_out)
        log.info("lm: corpus %s (Python %s, sha256 %s): %d training and %d held-out tokens", corpus.name,
                 corpus.python_version, corpus.sha256[:12], len(self.stream), len(self.held_out_stream))
        tok = self.tokenizer
        self.model_cfg = text_config(tok.vocab_size, tok.sot_token_id, tok.eot_token_id, width=opts.width,
                                     depth=opts.depth, heads=opts.heads, max_seq_len=opts.context,
                                     qk_norm=opts.qk_norm, corpus={**corpus.describe(), "seq_len": opts.seq_len})
        return UnifiedLM(self.model_cfg).to(self.rt.device)

    def batches(self) -> Any:
        from ...unified.mixing import MixedBatches, MixSchedule

        text_only = MixSchedule((1.0, 0.0, 0.0), (1.0, 0.0, 0.0), 0, False)
        return MixedBatches(self.model_cfg, text_only, stream=self.stream, batch_size=self.cfg.data.batch_size,
                            text_len=self.seq_len, seed=self.cfg.seed, rank=self.rt.rank,
                            world_size=self.rt.world_size, accum_steps=self.cfg.optim.accum_steps)  # fmt: skip

    def evaluate(self, model: nn.Module, *, name: str) -> dict[str, Any]:
        return {"text_ppl": self.text_perplexity(model, self.options.eval_windows)}

    def save_export(self, model: nn.Module, out_dir: Path) -> Path:
        from ...unified.pipeline import save_unified

        return save_unified(out_dir, model, self.tokenizer)


class UnifiedTask(_SequenceTask):
    """UM3: one decoder, one vocabulary, mixed text / image->text / text->image batches."""

    section = "unified"
    section_class = UnifiedOptions

    @property
    def loss_weighting(self) -> str:
        return self.options.loss_weighting

    @classmethod
    def check_startup(cls, cfg: TrainConfig) -> None:
        from ...unified.pipeline import read_unified_config

        opts = cfg.task_options
        try:
            init = read_unified_config(opts.init)
        except ValueError as e:
            raise ConfigError(f"unified.init={opts.init}: {e}") from None
        if init.image is not None:
            raise ConfigError(f"unified.init={opts.init} is already a unified model; start from a language model "
                              "(run_dir/last of a task: lm run)")  # fmt: skip
        check_tokenizer_dir(opts.tokenizer, "unified.tokenizer")
        if not Path(opts.tokens).exists():
            raise ConfigError(f"unified.tokens={opts.tokens}: no such token folder; make it with `qlip tokenize "
                              f"--model {opts.tokenizer} --data SOURCE --out {opts.tokens}`")  # fmt: skip

    def build_model(self) -> nn.Module:
        from ...factory import create_model
        from ...tokenfile import TokenSpec
        from ...tokenizer import get_tokenizer_from_dir
        from ...unified.corpus import load_corpus
        from ...unified.model import ImageVocab, extend_vocabulary
        from ...unified.pipeline import load_lm
        from ...unified.text import token_stream
        from .generator import read_token_folder

        opts = self.options
        lm = load_lm(opts.init).to(self.rt.device)
        self.tokenizer = get_tokenizer_from_dir(opts.init)
        self.qlip = create_model(opts.tokenizer, device=self.rt.device).requires_grad_(False).eval()
        ours = TokenSpec.of(self.qlip)
        tokens, captions, spec = read_token_folder(opts.tokens)
        if (spec.grid, spec.bits) != (ours.grid, ours.bits) or (
                spec.fingerprint and ours.fingerprint and spec.fingerprint != ours.fingerprint):  # fmt: skip
            raise ConfigError(f"unified.tokens={opts.tokens} holds {spec.grid}x{spec.grid} tokens of {spec.bits} bits "
                              f"({spec.model}) but unified.tokenizer={opts.tokenizer} makes {ours.grid}x{ours.grid} "
                              f"tokens of {ours.bits} bits; tokenize with that model")  # fmt: skip
        try:
            image = ImageVocab(ours.model, ours.grid, ours.bits, opts.parts, ours.fingerprint)
        except ValueError as e:
            raise ConfigError(f"unified.parts: {e}") from None
        corpus_info = lm.cfg.corpus
        corpus = load_corpus(corpus_info.get("spec") or corpus_info["name"], corpus_info.get("held_out_share", 0.05))
        if corpus.sha256 != corpus_info.get("sha256"):
            log.warning("unified: the text corpus differs from the one %s learnt from (sha256 %s, not %s; another "
                        "Python?): perplexities are not comparable", opts.init, corpus.sha256[:12],
                        str(corpus_info.get("sha256"))[:12])  # fmt: skip
        self.seq_len = int(corpus_info.get("seq_len") or lm.cfg.ar.max_seq_len // 2)
        self.stream = token_stream(self.tokenizer, corpus.train)
        self.held_out_stream = token_stream(self.tokenizer, corpus.held_out)
        reference = {"init": str(opts.init), "text_ppl": self.text_perplexity(lm, opts.eval_windows),
                     "eval_windows": opts.eval_windows, "window": self.seq_len + 1}  # fmt: skip
        model = extend_vocabulary(lm, image, visual_bits=opts.visual_bits, visual_positions=opts.visual_positions)
        model.cfg.reference = reference
        self.model_cfg = model.cfg
        cache: dict[str, list[int]] = {}
        self.captions = [cache.setdefault(c, self.tokenizer.encode(c)) for c in captions]
        longest = 4 + image.steps + max(map(len, cache.values()))  # the markers, sot and eot
        if longest > model.cfg.ar.max_seq_len:
            raise ConfigError(f"an image row holds {longest} tokens but {opts.init} reads at most "
                              f"{model.cfg.ar.max_seq_len}; train the language model with a larger lm.context")
        with torch.no_grad():
            self.visual = model.to_visual_ids(tokens.to(self.rt.device)).cpu()
        self.caption_text, self.tokens = captions, tokens
        log.info("unified: %d images with captions; text perplexity of %s: %.2f", len(captions), opts.init,
                 reference["text_ppl"])  # fmt: skip
        return model

    def batches(self) -> Any:
        from ...unified.mixing import MixedBatches

        opts = self.options
        return MixedBatches(self.model_cfg, opts.schedule_object(), stream=self.stream, visual=self.visual,
                            captions=self.captions, batch_size=self.cfg.data.batch_size, text_len=self.seq_len,
                            caption_dropout=opts.caption_dropout, seed=self.cfg.seed, rank=self.rt.rank,
                            world_size=self.rt.world_size, accum_steps=self.cfg.optim.accum_steps)  # fmt: skip

    def evaluate(self, model: nn.Module, *, name: str) -> dict[str, Any]:
        """Held-out text perplexity (and its change from the initial LM); with ``eval_images``, the caption
        attribute accuracy on that many training images and a picture: real decodings over samples of their
        captions."""
        from ...unified.pipeline import UnifiedModel

        opts = self.options
        ppl = self.text_perplexity(model, opts.eval_windows)
        init = self.model_cfg.reference["text_ppl"]
        out: dict[str, Any] = {"text_ppl": ppl, "text_ppl_init": init, "text_ppl_change": 100.0 * (ppl / init - 1)}
        n = min(opts.eval_images, len(self.captions))
        if n == 0:
            return out
        from ...transforms import to_uint8
        from ...unified.evaluate import caption_accuracy
        from ..evaluate import save_grid

        um = UnifiedModel(model, self.tokenizer, self.qlip)
        tokens = self.tokens[:n].to(self.rt.device)
        captions = um.caption(tokens, seed=0)
        out.update(caption_accuracy(captions, self.caption_text[:n]))
        sampled = um.generate_tokens(self.caption_text[:n], cfg_scale=opts.eval_cfg_scale, seed=0)
        with torch.no_grad():
            real, fake = self.qlip.decode(tokens), self.qlip.decode(sampled)
        save_grid(to_uint8(real.float().cpu()), to_uint8(fake.float().cpu()), self.grid_path(name))
        model.train()
        return out

    def export_model(self, state: dict[str, torch.Tensor]) -> nn.Module:
        self.qlip.to("cpu")  # the export is the run's last act
        return super().export_model(state)

    def save_export(self, model: nn.Module, out_dir: Path) -> Path:
        from ...unified.pipeline import save_unified

        return save_unified(out_dir, model, self.tokenizer, self.qlip)
