"""The vision-language model as a task of the one training loop (``task: vlm``): LLaVA's two stages.

* ``stage: 1`` trains the projector on captioning conversations, the language model frozen (LLaVA's
  feature alignment); ``vlm.stage1_trains_lm: true`` trains the LM too (needed when it starts from scratch).
* ``stage: 2`` trains projector + language model on question-answer instructions, from ``init`` (the VLM
  directory a stage-1 run exported) or from scratch. ``vlm.caption_steps: N`` runs stage 1 first within the same run:
  the first N optimizer steps are captioning conversations, the rest instructions (one command for both stages).
  A pretrained ``hf`` language model trains as ``vlm.lm_train`` says: "lora" (low-rank adapters, the default in
  stage 2), "full" (every weight) or "frozen" (the default in stage 1: the projector alone trains).

The vision tower (a QLIP encoder) stays frozen. ``vlm.features`` says where its features of the training images come
from: "cache" computes them once and keeps them in memory (a small image set, such as the shapes pool), "stream"
has DataLoader workers (``data.num_workers``) read each batch's images and the tower encode them inside the step,
without a gradient (a LLaVA-size set), and "auto" (the default) caches when the estimated cache fits in
``vlm.cache_budget_mb``. The export, ``run_dir/last``, is a self-contained VLM directory
(:func:`qlip.understanding.save_vlm`).

Config (``vlm:`` section, see :class:`VLMOptions`)::

    task: vlm
    stage: 2
    vlm: {tokenizer: runs/shapes-tiny-stage2/last, data: "shapes:easy?holdout_combinations=0.1", caption_steps: 400,
          stage1_trains_lm: true, width: 256, depth: 4, heads: 4}
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, TrainConfig
from ..vlm_data import BatchPlan, ConversationBatches, ConversationItems, PackedRecords
from .base import StepLosses, Task, check_tokenizer_dir

log = logging.getLogger(__name__)

LM_TRAINING = ("full", "lora", "frozen")
FEATURE_SOURCES = ("auto", "cache", "stream")
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAOptions:
    """The ``vlm.lora:`` section: low-rank adapters of an ``hf`` language model (``vlm.lm_train: lora``).

    Attributes:
        rank: the adapters' rank r. LLaVA-1.5 uses 128 for 7B / 13B LMs (4096-5120 wide); 16 suits a small LM
            such as SmolLM2-135M (576 wide, key / value projections 192 wide), where 128 would be nearly full rank.
        alpha: the update is scaled by alpha / rank; 2 x rank, LLaVA-1.5's ratio (256 / 128).
        dropout: dropout on the adapters' input (LLaVA-1.5: 0.05).
        targets: the Linear layers that get adapters, by their last name parts: every attention and MLP projection
            of a Llama-family LM (Llama, Vicuna, SmolLM2, Qwen2 name them alike).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))

    def to_lm_config(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}


@dataclass
class VLMOptions:
    """The ``vlm:`` section.

    Attributes:
        tokenizer: the QLIP model directory whose image encoder is the vision tower.
        feature: "layer" (continuous features of encoder block ``layer``) or "codes" (the BSQ codes: the ablation).
        layer: the encoder block for "layer": -2 (second to last, the paper's choice) or -1 (last), ...
        include_cls: put the CLS token before the patch tokens.
        projector: "mlp2x_gelu" (LLaVA-1.5) or "linear".
        feature_norm: layer-normalize each image position's features (no parameters) before the projector.
        merge: concatenate each merge x merge block of patch features before the projector: merge**2 times fewer
            image positions for the language model (1 = one per patch, LLaVA's).
        lm: the language model kind: "qlip-ar" (the package's ARTransformer, trained from scratch with a word
            tokenizer built from the training texts) or "hf" (a pretrained causal LM read from ``lm_source``, with
            its own tokenizer and chat template; the export keeps the source and what training changed of it).
        lm_source: where an "hf" language model is read from: "smollm2", a .gguf file or a local Hugging Face folder
            (with ``init``, the init directory's source is used and this may stay empty).
        lm_train: how an "hf" language model trains: "frozen" (the projector alone; the default in stage 1), "lora"
            (low-rank adapters, see ``lora``; the default in stage 2) or "full" (every weight). Empty: the default.
            The "qlip-ar" LM has no pretrained weights to adapt: it trains fully (in stage 1 with
            ``stage1_trains_lm``), and this key is refused for it.
        lora: the adapters of ``lm_train: lora`` (:class:`LoRAOptions`).
        projector_lr: the projector's peak learning rate (None: ``optim.lr``, as every other parameter); LLaVA-1.5's
            LoRA recipe trains the adapters at 2e-4 and the projector at 2e-5.
        width, depth, heads: the "qlip-ar" language model.
        data: the stage's conversations: a ``shapes[:preset][?field=value...]`` spec (captions in stage 1,
            question-answer instructions in stage 2; held-out triples via ``holdout_combinations``) or a LLaVA JSON
            conversation file.
        image_root: the folder a LLaVA file's image paths are relative to (default: the file's folder).
        image_pool: how many shapes training images (each step asks a fresh question about some of them).
        features: where the tower's features of the training images come from: "cache" (encoded once, kept in
            memory on every rank), "stream" (each batch's images read by ``data.num_workers`` DataLoader workers,
            this rank's share only, and encoded inside the step) or "auto": "cache" when the estimated cache
            (images x positions x width x 4 bytes) fits in ``cache_budget_mb``, else "stream".
        cache_budget_mb: the largest feature cache "auto" keeps, in MB (10^6 bytes) per rank.
        caption_steps: with stage 2 on shapes, the first this many optimizer steps are stage 1 (captions).
        stage1_trains_lm: stage 1 trains the language model too (a from-scratch LM must learn language).
        stage1_data: the shapes conversations of stage 1: "caption" (LLaVA's feature alignment) or "qa" (the
            question-answer instructions: a frozen pretrained LM learns the task through the projector alone).
        eval_images: held-out shapes images of the in-training check (one question of each type per image, held-out
            phrasings); 0 = no check.
        yesno_share: the share of shapes questions that are yes/no questions (the other types share the rest
            equally); 0 = every question type equally often.
        reword: the share of shapes training questions reworded with a lead-in and a place phrase
            (:func:`qlip.understanding.data.reword`); 0 = the training phrasings as they are.
    """

    tokenizer: str = ""
    feature: str = "layer"
    layer: int = -2
    include_cls: bool = False
    projector: str = "mlp2x_gelu"
    merge: int = 1
    feature_norm: bool = False
    lm: str = "qlip-ar"
    lm_source: str = ""
    lm_train: str = ""
    lora: LoRAOptions = field(default_factory=LoRAOptions)
    projector_lr: float | None = None
    width: int = 256
    depth: int = 4
    heads: int = 4
    data: str = "shapes:easy?sizes=large&holdout_combinations=0.1"
    image_root: str = ""
    image_pool: int = 4000
    features: str = "auto"
    cache_budget_mb: float = 4096.0
    caption_steps: int = 0
    stage1_trains_lm: bool = False
    stage1_data: str = "caption"
    eval_images: int = 100
    yesno_share: float = 0.0
    reword: float = 0.0

    def validate(self, cfg: TrainConfig) -> None:
        from ...understanding.model import FEATURES, PROJECTORS

        if not self.tokenizer:
            raise ConfigError("vlm.tokenizer is not set: name the QLIP model directory whose encoder is the vision "
                              "tower, e.g. vlm.tokenizer=runs/shapes-tiny-stage2/last")  # fmt: skip
        if self.feature not in FEATURES:
            raise ConfigError(f"vlm.feature={self.feature!r} is not one of {list(FEATURES)}")
        if self.projector not in PROJECTORS:
            raise ConfigError(f"vlm.projector={self.projector!r} is not one of {list(PROJECTORS)}")
        if self.lm not in ("qlip-ar", "hf"):
            raise ConfigError(f"vlm.lm={self.lm!r} is not one of ['qlip-ar', 'hf']")
        if self.lm == "hf" and not self.lm_source and cfg.init is None:
            raise ConfigError("vlm.lm=hf needs vlm.lm_source: the pretrained language model to read")
        if self.lm_train and self.lm_train not in LM_TRAINING:
            raise ConfigError(f"vlm.lm_train={self.lm_train!r} is not one of {list(LM_TRAINING)}")
        if self.lm_train and self.lm != "hf":
            raise ConfigError(f"vlm.lm_train={self.lm_train} is for a pretrained language model (vlm.lm=hf); the "
                              "qlip-ar LM trains from scratch, fully (in stage 1 with vlm.stage1_trains_lm=true): "
                              "remove vlm.lm_train")  # fmt: skip
        if self.lm == "hf" and self.stage1_trains_lm:
            raise ConfigError("vlm.stage1_trains_lm is for the qlip-ar LM; an hf language model trains as "
                              "vlm.lm_train says: set vlm.lm_train=full or lora")  # fmt: skip
        if self.projector_lr is not None and not (math.isfinite(self.projector_lr) and self.projector_lr > 0):
            raise ConfigError(f"vlm.projector_lr must be a finite number > 0, got {self.projector_lr}; e.g. 2e-5")
        if self.lora.rank < 1 or self.lora.alpha <= 0 or not 0.0 <= self.lora.dropout < 1.0 or not self.lora.targets:
            raise ConfigError(f"vlm.lora needs rank >= 1, alpha > 0, dropout in [0, 1) and at least one target, got "
                              f"{self.lora.to_lm_config()}")  # fmt: skip
        for key in ("width", "depth", "heads", "image_pool", "merge"):
            if getattr(self, key) < 1:
                raise ConfigError(f"vlm.{key} must be >= 1, got {getattr(self, key)}")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ConfigError(f"vlm.width={self.width} must split into vlm.heads={self.heads} heads of an even size")
        if self.features not in FEATURE_SOURCES:
            raise ConfigError(f"vlm.features={self.features!r} is not one of {list(FEATURE_SOURCES)}")
        if not self.cache_budget_mb >= 0:
            raise ConfigError(f"vlm.cache_budget_mb must be >= 0, got {self.cache_budget_mb}")
        if self.stage1_data not in ("caption", "qa"):
            raise ConfigError(f"vlm.stage1_data={self.stage1_data!r} is not one of ['caption', 'qa']")
        if not 0.0 <= self.yesno_share < 1.0:
            raise ConfigError(f"vlm.yesno_share must lie in [0, 1), got {self.yesno_share}")
        if not 0.0 <= self.reword <= 1.0:
            raise ConfigError(f"vlm.reword must lie in [0, 1], got {self.reword}")
        if self.caption_steps < 0 or self.eval_images < 0:
            raise ConfigError("vlm.caption_steps and vlm.eval_images must be >= 0")
        if self.caption_steps and cfg.stage != 2:
            raise ConfigError("vlm.caption_steps runs stage 1 before stage 2 in one run: it needs stage=2")
        if self.caption_steps and not self.is_shapes:
            raise ConfigError("vlm.caption_steps needs shapes data (a LLaVA file holds one stage's conversations): "
                              "run stage 1 and stage 2 as two runs, the second with init=STAGE1_RUN/last")  # fmt: skip
        if self.caption_steps >= cfg.optim.steps:
            raise ConfigError(f"vlm.caption_steps={self.caption_steps} leaves no stage-2 step of optim.steps="
                              f"{cfg.optim.steps}")  # fmt: skip

    def lm_training(self, stage: int) -> str:
        """How the language model trains in ``stage``: one of LM_TRAINING ("qlip-ar": "full", or "frozen" in a
        stage 1 without stage1_trains_lm)."""
        if self.lm != "hf":
            return "full" if stage == 2 or self.stage1_trains_lm else "frozen"
        return self.lm_train or ("frozen" if stage == 1 else "lora")

    @property
    def is_shapes(self) -> bool:
        return self.data.split(":", 1)[0].split("?", 1)[0] == "shapes"


def choose_features(choice: str, images: int, positions: int, width: int, budget_mb: float) -> tuple[str, str]:
    """("cache" or "stream", why) for ``vlm.features=choice`` over ``images`` training images whose features are
    (positions, width) float32 each: "auto" caches when that cache fits in ``budget_mb``."""
    size_mb = images * positions * width * 4 / 1e6
    size = f"{size_mb:,.0f} MB" if size_mb >= 1 else f"{size_mb * 1000:.0f} kB"
    estimate = f"{images:,} images x {positions} x {width} float32 features = {size} per rank"
    if choice != "auto":
        return choice, f"vlm.features={choice}; a cache would hold {estimate}"
    if size_mb <= budget_mb:
        return "cache", f"vlm.features=auto: {estimate}, within vlm.cache_budget_mb={budget_mb:g}"
    return "stream", f"vlm.features=auto: {estimate}, over vlm.cache_budget_mb={budget_mb:g}"


class VLMTask(Task):
    """LLaVA over a frozen QLIP vision tower; see the module docstring."""

    section = "vlm"
    section_class = VLMOptions
    progress_unit = "conv/s"

    @classmethod
    def check_startup(cls, cfg: TrainConfig) -> None:
        opts = cfg.task_options
        check_tokenizer_dir(opts.tokenizer, "vlm.tokenizer")
        if not opts.is_shapes and not Path(opts.data).is_file():
            raise ConfigError(f"vlm.data={opts.data}: neither a shapes spec nor a LLaVA JSON file")
        if cfg.init is not None and not (Path(cfg.init) / "config.json").is_file():
            raise ConfigError(f"init={cfg.init}: no VLM directory there (the run_dir/last of a stage-1 vlm run)")

    @classmethod
    def check_export_target(cls, out_dir: Path) -> None:
        from ...understanding.errors import UnderstandingError
        from ...understanding.pipeline import check_vlm_target

        try:
            check_vlm_target(out_dir)
        except UnderstandingError as e:
            raise ConfigError(str(e)) from None

    # --- building ---------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from ...understanding import UnderstandingError

        opts = self.options
        try:
            self.tower = self._build_tower(self.rt.device)
            self._read_data()
            model = self._build_vlm()
        except UnderstandingError as e:
            raise ConfigError(f"vlm: {e}") from None
        self.model_ref = model
        self._configure_lm_training(model)
        self.conversation_items = ConversationItems(self.items, records=self.records, shapes=self.shapes,
                                                    seed=self.cfg.seed, image_size=self.tower.image_size,
                                                    yesno_share=opts.yesno_share, reword=opts.reword)  # fmt: skip
        self._features = self._cache_features() if self.feature_source == "cache" else None
        return model

    def _build_tower(self, device: torch.device | str) -> nn.Module:
        from ...factory import create_model
        from ...understanding.model import TowerConfig, VisionTower

        opts = self.options
        parts = ("vision", "quantizer") if opts.feature == "codes" else ("vision",)
        qlip_model = create_model(opts.tokenizer, parts=parts, device=device)
        return VisionTower(qlip_model, TowerConfig(opts.feature, opts.layer, opts.include_cls))

    def _read_data(self) -> None:
        from ...data.loader import shapes_config_from_spec
        from ...understanding.data import drop_unreadable_images, read_llava_json

        opts = self.options
        if opts.is_shapes:
            try:
                self.shapes = shapes_config_from_spec(opts.data, self.tower.image_size)
            except ValueError as e:
                raise ConfigError(f"vlm.data: {e}") from None
            self.records = None
            self.items = opts.image_pool
            self._choose_features(self.items)
        else:  # the images are decoded here only for a cache (a few thousand); streamed ones when a batch reads them
            data = read_llava_json(opts.data, opts.image_root or None, check_images=False)
            if self._choose_features(len(data.records)) == "cache":
                data = drop_unreadable_images(data)
            self.records, self.shapes = PackedRecords(data.records), None
            self.items = len(self.records)
            log.info("vlm: %d conversations from %s (%d bad skipped; %.0f MB in memory)", self.items, opts.data,
                     len(data.bad), self.records.nbytes / 1e6)  # fmt: skip
        if self.items < self.rt.world_size:
            raise ConfigError(f"vlm.data={opts.data} holds {self.items} usable conversation(s), fewer than the "
                              f"{self.rt.world_size} ranks; give more data or fewer ranks")  # fmt: skip

    def _corpus(self) -> list[str]:
        """Every text of the training conversations (the word vocabulary of a from-scratch LM)."""
        from ...understanding.data import shapes_corpus

        if self.records is None:
            return shapes_corpus(self.shapes, seed=self.cfg.seed)
        return [t for r in self.records for turn in r["turns"] for t in turn]

    def _choose_features(self, images: int) -> str:
        """Set (and log) ``feature_source``: whether the tower's features of ``images`` images are cached or
        streamed."""
        opts, tower = self.options, self.tower.cfg
        self.feature_source, why = choose_features(opts.features, images, tower.tokens, tower.width,
                                                   opts.cache_budget_mb)  # fmt: skip
        if self.rt.is_main:
            workers = self.cfg.data.num_workers
            readers = f"{workers} DataLoader workers per rank" if workers else "the training process (no workers)"
            how = "cached in memory"
            if self.feature_source == "stream":
                how = f"streamed (each batch's images read by {readers}, this rank's share only, encoded in the step)"
            log.info("vlm: tower features %s: %s", how, why)
        return self.feature_source

    def _build_vlm(self) -> nn.Module:
        import dataclasses

        from ...ar import ARConfig, ARTransformer
        from ...hf.causal_lm import SMOLLM2
        from ...nn.lora import merge_lora
        from ...understanding import load
        from ...understanding.model import LMConfig, VisionLanguageModel, VLMConfig, render_conversation
        from ...understanding.pipeline import build_language_model
        from ...understanding.text import WordTokenizer

        opts = self.options
        if self.cfg.init is not None:  # stage 2 after stage 1: the language model, tokenizer and projector
            start = load(self.cfg.init)
            mine = (self.tower.cfg, opts.projector, opts.merge, opts.feature_norm)
            if (start.cfg.tower, start.cfg.projector, start.cfg.merge, start.cfg.feature_norm) != mine:
                raise ConfigError(f"init={self.cfg.init} was trained with tower {start.cfg.tower}, projector "
                                  f"{start.cfg.projector}, merge {start.cfg.merge} and feature_norm "
                                  f"{start.cfg.feature_norm}, not the vlm section's; make them equal")  # fmt: skip
            if start.cfg.lm.kind != opts.lm:
                raise ConfigError(f"init={self.cfg.init} holds a {start.cfg.lm.kind!r} language model and vlm.lm is "
                                  f"{opts.lm!r}; make them equal")  # fmt: skip
            if start.cfg.lm.weights != "source":  # a tuned hf LM: its adapters or weights would need a base of theirs
                if opts.lm_training(self.cfg.stage) != "full":
                    raise ConfigError(f"init={self.cfg.init} already holds a tuned language model (lm weights "
                                      f"{start.cfg.lm.weights!r}); start from a stage-1 VLM directory, or set "
                                      "vlm.lm_train=full to tune all of it further")  # fmt: skip
                merge_lora(start.lm)
                start.cfg = dataclasses.replace(start.cfg, lm=dataclasses.replace(start.cfg.lm, weights="source",
                                                                                   lora=None))  # fmt: skip
            self.vlm_cfg, self.tokenizer = start.cfg, start.tokenizer
            model = VisionLanguageModel(start.cfg, self.tower, start.lm, start.tokenizer)
            model.projector.load_state_dict(start.projector.state_dict())
            return model.to(self.rt.device)
        if opts.lm == "qlip-ar":
            corpus = self._corpus()
            self.tokenizer = WordTokenizer.from_corpus(corpus)
            longest = max(len(self.tokenizer.encode(self.tokenizer.chat_prompt(t))) for t in corpus[:20000])
            ar = ARConfig(vocab_size=self.tokenizer.vocab_size, width=opts.width, depth=opts.depth, heads=opts.heads,
                          max_seq_len=self.tower.cfg.tokens // opts.merge**2 + 2 * longest + 32)  # fmt: skip
            lm_cfg = LMConfig("qlip-ar", ar=ar.to_dict())
            lm = ARTransformer(ar)
        else:  # a path is kept absolute, so the exported VLM finds its LM from any working directory
            source = opts.lm_source if opts.lm_source == SMOLLM2 else str(Path(opts.lm_source).expanduser().resolve())
            lm_cfg = LMConfig("hf", source=source)
            lm, self.tokenizer = build_language_model(lm_cfg)
        self.vlm_cfg = VLMConfig(tower=self.tower.cfg, projector=opts.projector, lm=lm_cfg, merge=opts.merge,
                                 feature_norm=opts.feature_norm)  # fmt: skip
        model = VisionLanguageModel(self.vlm_cfg, self.tower, lm, self.tokenizer).to(self.rt.device)
        if self.records is not None:
            too_long = [r["key"] for r in self.records
                        if len(render_conversation(self.tokenizer, r["turns"])[0]) + model.image_tokens
                        > model.lm.max_seq_len]  # fmt: skip
            if too_long:
                raise ConfigError(f"{len(too_long)} conversation(s) are longer than the language model's context "
                                  f"({model.lm.max_seq_len}), e.g. {too_long[0]}; shorten them")  # fmt: skip
        return model

    def _configure_lm_training(self, model: nn.Module) -> None:
        """Freeze the language model, wrap it in LoRA adapters or leave it all trainable (``vlm.lm_train``), and
        record in the VLM config what the export keeps of an hf LM."""
        import dataclasses

        from ...understanding.pipeline import apply_lora

        mode = self.options.lm_training(self.cfg.stage)
        lm_cfg = self.vlm_cfg.lm
        if lm_cfg.kind == "hf" and mode == "lora":
            lora = self.options.lora.to_lm_config()
            apply_lora(model.lm, lora, where=f"lm.source {lm_cfg.source!r} (vlm.lora.targets)")
            lm_cfg = dataclasses.replace(lm_cfg, weights="lora", lora=lora)
        else:
            model.lm.requires_grad_(mode == "full")
            if lm_cfg.kind == "hf":
                lm_cfg = dataclasses.replace(lm_cfg, weights="full" if mode == "full" else "source", lora=None)
        self.vlm_cfg = dataclasses.replace(self.vlm_cfg, lm=lm_cfg)
        model.cfg = dataclasses.replace(model.cfg, lm=lm_cfg)
        self._lm_trainable = [p for p in model.lm.parameters() if p.requires_grad]
        if self.rt.is_main:
            count = sum(p.numel() for p in self._lm_trainable)
            log.info("vlm: language model %s (%d trainable parameters)", mode, count)

    def rebuilt_state_keys(self, model: nn.Module) -> set[str]:
        """The frozen tower, and an hf LM's weights unless they train in full: build_model reads them from the
        tokenizer directory and the LM's source (LoRA adapters and the projector are checkpointed)."""
        frozen_lm = self.vlm_cfg.lm.kind == "hf" and self.vlm_cfg.lm.weights != "full"
        return {k for k in model.state_dict() if k.startswith("tower.") or
                (frozen_lm and k.startswith("lm.") and not k.endswith((".lora_a", ".lora_b")))}  # fmt: skip

    @torch.no_grad()
    def _cache_features(self) -> torch.Tensor:
        """The tower's features of every training image, (items, N, C) on the run's device: computed once, before
        the model is wrapped (a sharded tower only runs inside the model's forward)."""
        from ...transforms import image_transform

        transform = image_transform(self.tower.image_size)
        feats = []
        for s in range(0, self.items, 256):
            pixels = torch.stack([transform(self.conversation_items.image(i))
                                  for i in range(s, min(s + 256, self.items))])  # fmt: skip
            feats.append(self.tower(pixels.to(self.rt.device)))
        if self.rt.is_main:
            log.info("vlm: encoded %d training images", self.items)
        return torch.cat(feats)

    def batches(self) -> ConversationBatches:
        from ...data import BadSampleCounter

        opts, cfg = self.options, self.cfg
        default = opts.stage1_data if cfg.stage == 1 else "qa"
        plan = BatchPlan(self.items, cfg.data.batch_size, cfg.seed, self.rt.rank, self.rt.world_size,
                         default_kind=default, caption_batches=opts.caption_steps * cfg.optim.accum_steps)  # fmt: skip
        counter = BadSampleCounter(max_bad_fraction=cfg.data.max_bad_fraction, name=f"vlm.data={opts.data}")
        self.stream = ConversationBatches(plan, self.conversation_items, images=self.feature_source == "stream",
                                          workers=cfg.data.num_workers, counter=counter)  # fmt: skip
        return self.stream

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The language model's blocks: the package's ARTransformer's, or a Hugging Face LM's decoder layers."""
        lm = model.lm
        if hasattr(lm, "blocks"):
            return list(lm.blocks)
        layers = getattr(getattr(getattr(lm, "lm", None), "base_model", None), "layers", None)
        return list(layers) if layers is not None else []

    def param_groups(self, model: nn.Module) -> list[dict]:
        """The loop's groups, with the projector's parameters in groups of their own at ``vlm.projector_lr``."""
        groups = super().param_groups(model)
        if self.options.projector_lr is None:
            return groups
        projector = {id(p) for p in model.projector.parameters()}
        out = []
        for group in groups:
            rest = [p for p in group["params"] if id(p) not in projector]
            mine = [p for p in group["params"] if id(p) in projector]
            if rest:
                out.append({**group, "params": rest})
            if mine:
                name = group["name"].replace("other", "projector", 1)
                out.append({**group, "params": mine, "lr": self.options.projector_lr, "name": name})
        return out

    def find_unused_parameters(self) -> bool:
        return bool(self.options.caption_steps) and not self.options.stage1_trains_lm

    def train_mode(self, model: nn.Module) -> None:
        model.train()  # the tower keeps itself in eval mode

    # --- one step -----------------------------------------------------------------------------------------------
    def losses(self, model: nn.Module, batch: Any, step: int) -> StepLosses:
        from ...understanding.model import collate_conversations, render_conversation

        vlm = self.model_ref
        if self.options.caption_steps and not self.options.stage1_trains_lm:
            for p in self._lm_trainable:  # stage 1 within the run: the LM (or its adapters) gets no update
                p.requires_grad_(batch["stage"] == 2)
        rendered = [render_conversation(self.tokenizer, turns) for turns in batch["turns"]]
        conv = collate_conversations(rendered, vlm.image_tokens, self.tokenizer.pad_id)
        conv = {k: v.to(self.rt.device, non_blocking=True) for k, v in conv.items()}
        if "pixels" in batch:  # streamed: the frozen tower reads them in the model's forward, under the autocast
            out = model(conv, images=batch["pixels"].to(self.rt.device, non_blocking=True))
        else:
            out = model(conv, self._features[batch["index"].to(self._features.device)])
        name = "caption" if batch["stage"] == 1 else "answer"
        return StepLosses(terms={name: out["loss"]}, total=out["loss"], samples=len(rendered), outputs=out)

    def log_metrics(self, last: StepLosses) -> dict[str, float]:
        out = last.outputs or {}
        metrics = {"vlm/token_accuracy": float(out["accuracy"])} if "accuracy" in out else {}
        if self.feature_source == "stream" and self.records is not None:
            metrics["vlm/bad_images"] = float(self.stream.bad)  # conversations dropped so far on this rank
        return metrics

    # --- evaluation and export ------------------------------------------------------------------------------------
    def _eval_shapes(self):
        import dataclasses

        cfg = self.shapes
        if cfg.holdout_combinations:
            cfg = dataclasses.replace(cfg, eval_combinations="held_out")
        return cfg

    def evaluate(self, model: nn.Module, *, name: str) -> dict[str, Any]:
        """VQA on held-out shapes images (held-out triples when the data holds some) with held-out phrasings."""
        if self.shapes is None or not self.options.eval_images:
            return {}
        from ...understanding.evaluate import evaluate_shapes_vqa

        return evaluate_shapes_vqa(model, self._eval_shapes(), num_images=self.options.eval_images, split="val",
                                   seed=self.cfg.seed, blind=False)["metrics"]  # fmt: skip

    def export_model(self, state: dict[str, torch.Tensor]) -> nn.Module:
        from ...understanding.model import VisionLanguageModel
        from ...understanding.pipeline import SOURCE_LM_KINDS, build_language_model

        if self.cfg.distributed.strategy == "fsdp" and self.rt.distributed:
            # the live tower and LM hold this rank's shards: whole ones (with the adapters' layers) for the state
            tower, (lm, _) = self._build_tower("cpu"), build_language_model(self.vlm_cfg.lm)
        elif self.vlm_cfg.lm.kind in SOURCE_LM_KINDS:
            tower = self.tower.to("cpu")
            lm = self.model_ref.lm.to("cpu")  # the trained structure (adapters); not read from its source again
        else:
            tower, (lm, _) = self.tower.to("cpu"), build_language_model(self.vlm_cfg.lm)
        model = VisionLanguageModel(self.vlm_cfg, tower, lm, self.tokenizer)
        model.load_state_dict({k: v for k, v in state.items()})
        return model

    def save_export(self, model: nn.Module, out_dir: Path) -> Path:
        from ...understanding.pipeline import save_vlm

        return save_vlm(out_dir, model)
