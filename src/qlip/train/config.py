"""The training configuration: a tree of dataclasses merged as defaults <- YAML file(s) <- ``a.b=c`` overrides.

The paper's values are in configs/b16-256-stage*.yaml and docs/training.md. Every field has a default, so a YAML
file only names what it changes. Command-line overrides are parsed as YAML scalars (``optim.lr=3e-4``,
``data.shapes.sizes=[small]``, ``init=null``). An unknown key is an error that names it and lists the valid ones.
The resolved configuration is written to ``run_dir/config.yaml`` so a run can always be repeated.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..transforms import RESIZE_MODES, parse_background


class ConfigError(ValueError):
    """A configuration the user must fix (unknown key, wrong type, impossible value)."""


@dataclass
class ModelSection:
    """Which architecture, and how it runs.

    Attributes:
        name: a registered architecture (``qlip models``) or a model directory (then ``init`` is implied).
        pretrained_clip: a CLIP-style state dict file (.safetensors / .pt / .bin) for the visual and text towers
            (OpenCLIP / EVA-CLIP or Hugging Face CLIPModel layout, see docs/training.md); None = no such init.
        pretrained_clip_parts: which towers to take from it ("visual", "text").
        grad_checkpointing: recompute transformer blocks in the backward pass (less memory, ~30% more compute).
        compile: wrap the model in torch.compile.
        attention: "sdpa" (fused) or "reference".
        bypass_quantizer: ablation (paper Table 3c): stage 1 reconstructs from the continuous l2-normalized latents,
            and the quantizer is learned afterwards in stage 2.
        text_tower: a pretrained text tower instead of the architecture's CLIP text transformer: "hf:minilm"
            (all-MiniLM-L6-v2, offline) or "hf:FOLDER" (a local BERT-like Hugging Face model), mean-pooled and
            projected to the embedding size; None = the architecture's own. Only for a fresh start (no ``init``).
        text_tower_trainable: what of a pretrained text tower trains: "projection" (the encoder stays frozen),
            "all", or "last-N" (its top N blocks and the projection).
    """

    name: str = "qlip-tiny"
    pretrained_clip: str | None = None
    pretrained_clip_parts: list[str] = field(default_factory=lambda: ["visual", "text"])
    grad_checkpointing: bool = False
    compile: bool = False
    attention: str = "sdpa"
    bypass_quantizer: bool = False
    text_tower: str | None = None
    text_tower_trainable: str = "projection"


@dataclass
class ShapesTrainingSection:
    """Options that only apply to training on the built-in shapes data.

    Attributes:
        bpe_vocab_size: vocabulary size of the BPE trained at start-up on shapes captions when no tokenizer is given
            (at most the text tower's vocab_size).
        bpe_captions: how many training captions that start-up BPE sees.
        group_by: hard-negative batches; part of every batch comes in groups of ``group_size`` images that share
            these attributes (e.g. ``[color, position]``), so only the others (shape, size) tell the captions of a
            group apart. Empty = plain batches.
        group_size: images per group.
        grouped_fraction: the share of each batch made of groups (the rest is drawn as usual).
    """

    bpe_vocab_size: int = 1024
    bpe_captions: int = 2000
    group_by: list[str] = field(default_factory=list)
    group_size: int = 8
    grouped_fraction: float = 0.5


@dataclass
class DataSection:
    """Where the pairs come from.

    Attributes:
        train: a data spec (``shapes[:preset]``, shards, caption list, class folder; see ``qlip.data``).
        val: held-out data for the periodic checks; None = the ``val`` split of shapes, or the ``val_fraction``
            held out of a caption list or class folder.
        val_fraction: without ``data.val``, this share of a caption list or class folder (``data.train``) is held out
            for the periodic checks and left out of training, chosen by ``seed`` (0 = no held-out checks on them).
        batch_size: images per rank per micro-step (global batch = batch_size x world size x optim.accum_steps).
        num_workers: DataLoader worker processes per rank.
        shapes: ShapesConfig fields for the built-in data (e.g. ``{sizes: [small, large], image_size: 64}``).
        shapes_training: how training uses the built-in data (its start-up BPE, hard-negative batches).
        tokenizer: a directory with vocab.json + merges.txt; None = the init checkpoint's, or (shapes only) a small
            BPE trained at start-up on shapes captions (``shapes_training.bpe_*``).
        augment: random resized crop (and hflip if ``hflip``) on training images.
        crop_scale: [min, max] area of the random resized crop, as fractions of the image (0 < min <= max <= 1).
        hflip: random horizontal flip when augmenting: true, false (shapes: left/right is a label), or "caption":
            flip only images whose caption names no side (left, right, clockwise, ...; see
            ``qlip.transforms.caption_names_a_side``), so every caption stays true.
        max_bad_fraction: stop when more than this fraction of samples cannot be read.
        shuffle_buffer: shards: block size of the within-slot shuffle.
        resize: how an image becomes the model's square: "crop" (fill it, cut the longer side; the released recipe)
            or "pad" (keep the whole image, fill the rest with ``background``); training and held-out checks alike.
        background: the color transparent images are flattened onto, and "pad" fills with: white, black or #rrggbb.
    """

    train: str = "shapes:easy"
    val: str | None = None
    val_fraction: float = 0.0
    batch_size: int = 32
    num_workers: int = 0
    shapes: dict[str, Any] = field(default_factory=dict)
    shapes_training: ShapesTrainingSection = field(default_factory=ShapesTrainingSection)
    tokenizer: str | None = None
    augment: bool = False
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    hflip: bool | str = False
    max_bad_fraction: float = 0.05
    shuffle_buffer: int = 0
    resize: str = "crop"
    background: str = "white"


# Keys that moved, old -> new: an old key is an error that names its new place.
MOVED_KEYS = {
    f"data.{name}": f"data.shapes_training.{name}"
    for name in ("bpe_vocab_size", "bpe_captions", "group_by", "group_size", "grouped_fraction")
}


@dataclass
class OptimSection:
    """Optimizer and schedule (the paper: LAMB, betas (0.9, 0.95), wd 0.05, peak 5e-4, clip 5).

    Attributes:
        name: "adamw" or "lamb".
        lr: peak learning rate of every group without its own rate.
        lr_visual, lr_text, lr_bottleneck, lr_decoder: per-module peak rates (None = ``lr``); the paper uses
            visual 2e-4, text 2e-5, decoder 2e-3 at peak 5e-4. The bottleneck is quant_in + quant_out.
        betas, eps, weight_decay: the optimizer's; norms, biases, embeddings and the logit scale get no decay.
        steps: optimizer steps of the whole schedule.
        warmup_steps: linear warm-up from 0.
        min_lr_ratio: the cosine ends at lr x min_lr_ratio.
        grad_clip: max global gradient norm (0 = off).
        accum_steps: micro-batches per optimizer step.
        max_nonfinite_steps: this many non-finite losses in a row stop the run.
        disc_lr, disc_betas, disc_weight_decay: the discriminator's AdamW (stage 2).
    """

    name: str = "adamw"
    lr: float = 5e-4
    lr_visual: float | None = None
    lr_text: float | None = None
    lr_bottleneck: float | None = None
    lr_decoder: float | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05
    steps: int = 1000
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 5.0
    accum_steps: int = 1
    max_nonfinite_steps: int = 5
    disc_lr: float = 1e-4
    disc_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    disc_weight_decay: float = 0.05


# The loss terms weighted in loss.balance.weights, per stage; LPIPS and the GAN have their own keys.
BALANCE_TERMS = {1: ("align", "recon", "quant", "commit"), 2: ("recon", "quant", "commit")}
OWN_WEIGHT_KEYS = {"lpips": "loss.lpips_weight", "gan": "loss.gan_weight"}
# Weights that depend on the stage when not set: stage 2 adds LPIPS and the GAN.
STAGE_DEFAULT_WEIGHT = {"lpips": {1: 0.0, 2: 0.1}, "gan": {1: 0.0, 2: 0.1}}


@dataclass
class LossSection:
    """Loss terms and their balancing.

    Attributes:
        balance: fields of ``qlip.losses.balance.BalanceConfig`` (mode, weights, converged, ...). ``weights``, when
            given, names every term of the stage (stage 1: align, recon, quant, commit; stage 2: recon, quant,
            commit), 0 turning a term off; LPIPS and the GAN are weighted by ``lpips_weight`` / ``gan_weight`` only.
        pixel: "mse" or "l1".
        gradient_weight: weight of an image-gradient term added to the pixel loss (0: the paper's loss); it weighs
            outlines against flat background (``qlip.losses.reconstruction.gradient_loss``).
        logit_scale_max: clamp of the learnable logit scale (exp'd), CLIP's 100.
        clip_local_loss: each rank computes only its rows of the global logits (less memory, same gradient).
        clip_chunk_size: compute the logits in row chunks of this size (None = at once).
        lpips_weight: LPIPS weight (None: 0.1 in stage 2, 0 in stage 1; 0 turns it off, otherwise lpips_vgg and
            lpips_lin are required).
        lpips_vgg, lpips_lin: local paths of vgg16-397923af.pth and LPIPS v0.1 vgg.pth.
        gan_weight: generator loss weight (None: 0.1 in stage 2, 0 in stage 1; 0 = no discriminator).
        gan_start: the step at which the adversarial terms switch on.
        gan_loss: "hinge" or "non-saturating".
        disc: "patchgan" or "stylegan".
        disc_width, disc_layers: discriminator size.
        adaptive_gan_weight: scale the generator loss by the VQGAN adaptive weight at the decoder's last layer.
        r1_weight: R1 gradient penalty weight on real images (0 = off).
        r1_every: apply R1 every this many steps (lazy regularization), scaled by it.
    """

    balance: dict[str, Any] = field(default_factory=dict)
    pixel: str = "mse"
    gradient_weight: float = 0.0
    logit_scale_max: float = 100.0
    clip_local_loss: bool = False
    clip_chunk_size: int | None = None
    lpips_weight: float | None = None
    lpips_vgg: str | None = None
    lpips_lin: str | None = None
    gan_weight: float | None = None
    gan_start: int = 0
    gan_loss: str = "hinge"
    disc: str = "patchgan"
    disc_width: int = 64
    disc_layers: int = 3
    adaptive_gan_weight: bool = False
    r1_weight: float = 0.0
    r1_every: int = 16


@dataclass
class DistributedSection:
    """How the computation is laid out.

    Attributes:
        strategy: "ddp" (default) or "fsdp" (FSDP2 ``fully_shard`` per transformer block, for large models).
        backend: "auto" (nccl on GPU, gloo on CPU), "nccl" or "gloo".
        device: "auto" (cuda when available), "cpu" or "cuda".
        precision: "auto" (bf16 autocast on GPU, fp32 on CPU), "fp32", "bf16" or "fp16" (with a grad scaler).
        threads: torch CPU threads per process (0 = leave torch's default).
        processes: worker processes that ``qlip train`` starts on this machine itself (data parallel, as
            ``torchrun --standalone --nproc_per_node N`` would; ``data.batch_size`` is per process). On a small CPU
            two 1-thread processes train more rows per second than one 2-thread process. Under torchrun, torchrun's
            world is used and this is ignored.
    """

    strategy: str = "ddp"
    backend: str = "auto"
    device: str = "auto"
    precision: str = "auto"
    threads: int = 0
    processes: int = 1

    @property
    def starts_workers(self) -> bool:
        """This process must start ``processes`` workers (more than one asked, and not already under torchrun)."""
        return self.processes > 1 and "WORLD_SIZE" not in os.environ


@dataclass
class CheckpointSection:
    """Never lose a run.

    Attributes:
        every: write a training checkpoint every this many steps (0 = only at the end and on signals).
        keep_last: keep this many newest checkpoints.
        ema_decay: keep an EMA of the weights with this decay (0 = no EMA).
        export: write ``run_dir/last`` (``save_pretrained`` + tokenizer) at the end.
    """

    every: int = 500
    keep_last: int = 3
    ema_decay: float = 0.0
    export: bool = True


@dataclass
class LoggingSection:
    """Progress and metrics.

    Attributes:
        every: log (JSONL, TensorBoard, progress bar) every this many steps.
        progress: show a tqdm progress bar (rank 0).
        tensorboard: write TensorBoard events when tensorboard is installed.
    """

    every: int = 10
    progress: bool = True
    tensorboard: bool = True


@dataclass
class EvalSection:
    """Periodic held-out checks: zero-shot accuracy, reconstruction PSNR, codebook usage, a PNG grid.

    Attributes:
        every: run the checks every this many steps (0 = only at the end).
        at_end: run them after the last step.
        num_samples: held-out images per check.
        batch_size: images per forward pass.
        tasks: zero-shot tasks of the shapes data to report (empty for real data without tasks).
        grid_images: images in the reconstruction grid.
    """

    every: int = 0
    at_end: bool = True
    num_samples: int = 500
    batch_size: int = 100
    tasks: list[str] = field(default_factory=lambda: ["shape", "color", "position", "size"])
    grid_images: int = 8


@dataclass
class ProbeSection:
    """``qlip balance``: single-objective probe runs that measure each objective's converged loss.

    Attributes:
        steps: optimizer steps of each probe run (the probe budget).
        tail_fraction: the converged value is the mean of the logged losses over this last fraction of the run.
        objectives: which single-objective runs to make.
    """

    steps: int = 200
    tail_fraction: float = 0.25
    objectives: list[str] = field(default_factory=lambda: ["align", "recon"])


@dataclass
class TrainConfig:
    """Everything a training run needs.

    Attributes:
        task: the model family to train (a name in ``qlip.train.tasks.TASKS``; "qlip", the tokenizer, by default).
            A task with options of its own reads them from its top-level section (e.g. ``generator:``), kept as
            ``task_options`` (not a field: ``to_dict`` writes it under the section's name).
        stage: 1 (alignment + reconstruction, all towers) or 2 (frozen visual encoder, no text tower,
            bottleneck + decoder with MSE + BSQ + LPIPS + GAN).
        init: a qlip model directory (ours or the released layout) to start from; None = random.
        resume: "auto" (newest complete checkpoint in run_dir, if any), "never", or a checkpoint file.
        stop_at: stop after this step although the schedule is longer (the schedule still follows optim.steps).
        seed: base seed; rank r draws from seed + r for data order and augmentation.
        run_dir: where checkpoints, metrics, grids and the exported model go.
    """

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    task: str = "qlip"
    stage: int = 1
    init: str | None = None
    resume: str = "auto"
    stop_at: int | None = None
    seed: int = 0
    run_dir: str = "runs/default"

    def __post_init__(self) -> None:
        self.task_options = default_task_options(self.task)
        self.validate()

    def _check_loss_weights(self) -> None:
        """Each loss term has one place for its weight, and an explicit ``loss.balance.weights`` names them all."""
        if not self.loss.gradient_weight >= 0:
            raise ConfigError(f"loss.gradient_weight must be >= 0 (0 turns the image-gradient term off), got "
                              f"{self.loss.gradient_weight}")  # fmt: skip
        weights = self.loss.balance.get("weights")
        if weights is None:
            return
        if not isinstance(weights, dict):
            raise ConfigError(f"loss.balance.weights must map loss terms to weights (e.g. {{recon: 1.0}}), got "
                              f"{weights!r}")  # fmt: skip
        for term, key in OWN_WEIGHT_KEYS.items():
            if term in weights:
                raise ConfigError(f"loss.balance.weights.{term} is not where the {term} weight goes: set {key} instead")
        unknown = sorted(set(weights) - set(BALANCE_TERMS[1]))
        if unknown:
            own = ", ".join(OWN_WEIGHT_KEYS.values())
            raise ConfigError(f"loss.balance.weights: unknown term(s) {unknown}; the terms are "
                              f"{', '.join(BALANCE_TERMS[1])} (LPIPS and GAN: {own})")  # fmt: skip
        terms = BALANCE_TERMS[self.stage]
        missing = [t for t in terms if t not in weights]
        if missing:
            raise ConfigError(f"loss.balance.weights lacks {', '.join(missing)}: stage {self.stage} weighs "
                              f"{', '.join(terms)}; give every one (0 turns a term off)")  # fmt: skip
        if self.stage == 2 and weights.get("align", 0) != 0:
            raise ConfigError("loss.balance.weights.align must be 0 (or absent) in stage 2, which has no text tower")

    @property
    def one_process_batch(self) -> int:
        """Rows per micro-step of the whole run on one machine: ``data.batch_size`` x ``distributed.processes``."""
        return self.data.batch_size * self.distributed.processes

    def as_one_process(self) -> TrainConfig:
        """A copy that runs in one process with the same global batch: ``distributed.processes: N`` becomes N times
        ``data.batch_size`` (what a caller of ``train`` from Python, such as an experiment's job, runs)."""
        one = copy.deepcopy(self)
        one.data.batch_size, one.distributed.processes = self.one_process_batch, 1
        return one

    def validate(self) -> None:
        """Cross-field checks, with what to change."""
        task = task_class(self.task)
        options = getattr(self, "task_options", None)
        if task.section_class is not None and hasattr(options, "validate"):
            options.validate(self)
        choices = {
            "stage": (self.stage, (1, 2)),
            "optim.name": (self.optim.name, ("adamw", "lamb")),
            "loss.pixel": (self.loss.pixel, ("mse", "l1")),
            "loss.gan_loss": (self.loss.gan_loss, ("hinge", "non-saturating")),
            "distributed.strategy": (self.distributed.strategy, ("ddp", "fsdp")),
            "distributed.backend": (self.distributed.backend, ("auto", "nccl", "gloo")),
            "distributed.device": (self.distributed.device, ("auto", "cpu", "cuda")),
            "distributed.precision": (self.distributed.precision, ("auto", "fp32", "bf16", "fp16")),
            "model.attention": (self.model.attention, ("sdpa", "reference")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")
        self._check_loss_weights()
        if self.model.text_tower is not None and not self.model.text_tower.startswith("hf:"):
            raise ConfigError(f"model.text_tower={self.model.text_tower!r}: give hf:minilm (all-MiniLM-L6-v2, "
                              "offline), hf:FOLDER (a local BERT-like Hugging Face model) or null (the "
                              "architecture's own)")
        if not re.fullmatch(r"projection|all|last-[1-9]\d*", self.model.text_tower_trainable):
            raise ConfigError(f"model.text_tower_trainable={self.model.text_tower_trainable!r} is not one of "
                              "'projection' (frozen encoder), 'all' or 'last-N' (the encoder's top N blocks)")
        positive = {
            "data.batch_size": self.data.batch_size,
            "distributed.processes": self.distributed.processes,
            "optim.steps": self.optim.steps,
            "optim.accum_steps": self.optim.accum_steps,
            "optim.max_nonfinite_steps": self.optim.max_nonfinite_steps,
            "logging.every": self.logging.every,
            "checkpoint.keep_last": self.checkpoint.keep_last,
            "probe.steps": self.probe.steps,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        non_negative = {
            "data.num_workers": self.data.num_workers,
            "data.shuffle_buffer": self.data.shuffle_buffer,
            "distributed.threads": self.distributed.threads,
            "checkpoint.every": self.checkpoint.every,
            "eval.every": self.eval.every,
            "eval.grid_images": self.eval.grid_images,
        }
        for key, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
        if self.eval.every or self.eval.at_end:
            for key, value in (("eval.num_samples", self.eval.num_samples), ("eval.batch_size", self.eval.batch_size)):
                if value < 1:
                    raise ConfigError(f"{key} must be >= 1 when the held-out checks run, got {value}")
        per_module = ("lr_visual", "lr_text", "lr_bottleneck", "lr_decoder")
        rates = {"optim.lr": self.optim.lr, "optim.disc_lr": self.optim.disc_lr,
                 **{f"optim.{k}": getattr(self.optim, k) for k in per_module if getattr(self.optim, k) is not None}}
        for key, value in rates.items():
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{key} must be a finite number > 0, got {value}; e.g. {key}=5e-4")
        for key in ("betas", "disc_betas"):
            betas = getattr(self.optim, key)
            if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
                raise ConfigError(f"optim.{key}={betas} must be two numbers in [0, 1), e.g. optim.{key}=[0.9,0.95]")
        nonneg_floats = {"optim.weight_decay": self.optim.weight_decay, "optim.disc_weight_decay":
                         self.optim.disc_weight_decay, "optim.grad_clip": self.optim.grad_clip}  # fmt: skip
        for key, value in nonneg_floats.items():
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key} must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.optim.eps) and self.optim.eps > 0):
            raise ConfigError(f"optim.eps must be a finite number > 0, got {self.optim.eps}")
        if not 0 <= self.optim.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must lie in [0, 1], got {self.optim.min_lr_ratio}")
        if self.data.resize not in RESIZE_MODES:
            raise ConfigError(f"data.resize={self.data.resize!r} is not one of {list(RESIZE_MODES)} (crop fills the "
                              "square, pad keeps the whole image)")  # fmt: skip
        try:
            parse_background(self.data.background)
        except ValueError as e:
            raise ConfigError(f"data.background: {e}") from None
        scale = self.data.crop_scale
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"data.crop_scale={scale} must be [min, max] with 0 < min <= max <= 1 (fractions of the "
                              "image area), e.g. data.crop_scale=[0.6,1.0]")  # fmt: skip
        if not (isinstance(self.data.hflip, bool) or self.data.hflip == "caption"):
            raise ConfigError(f"data.hflip={self.data.hflip!r} is not true, false or caption (flip only images whose "
                              "caption names no side)")  # fmt: skip
        if not 0.0 <= self.data.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must lie in [0, 1) (the share of data.train held out), got "
                              f"{self.data.val_fraction}")  # fmt: skip
        if self.data.val_fraction and self.data.val is not None:
            raise ConfigError(f"data.val={self.data.val} and data.val_fraction={self.data.val_fraction} both name the "
                              "held-out data; keep one (data.val_fraction=0 or data.val=null)")  # fmt: skip
        if not 0 <= self.data.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction must lie in [0, 1] (a fraction of the samples), got "
                              f"{self.data.max_bad_fraction}")  # fmt: skip
        if self.data.shapes:
            from ..data.shapes import ShapesConfig

            allowed = [f.name for f in fields(ShapesConfig)]
            unknown = sorted(set(self.data.shapes) - set(allowed))
            if unknown:
                raise ConfigError(f"unknown data.shapes field(s) {unknown}; allowed: {', '.join(allowed)}")
        if not 0 <= self.optim.warmup_steps <= self.optim.steps:
            raise ConfigError(f"optim.warmup_steps={self.optim.warmup_steps} must lie in [0, optim.steps]")
        if not 0 <= self.checkpoint.ema_decay < 1:
            raise ConfigError(f"checkpoint.ema_decay must lie in [0, 1), got {self.checkpoint.ema_decay}")
        if not 0 < self.probe.tail_fraction <= 1:
            raise ConfigError(f"probe.tail_fraction must lie in (0, 1], got {self.probe.tail_fraction}")
        st = self.data.shapes_training
        if st.group_by:
            where = "data.shapes_training"
            if not set(st.group_by) <= {"shape", "color", "position", "size"}:
                raise ConfigError(f"{where}.group_by={st.group_by} may only name shape, color, position, size")
            if not (self.data.train.startswith("shapes") and 1 <= st.group_size <= self.data.batch_size):
                raise ConfigError(
                    f"{where}.group_by needs shapes data and 1 <= {where}.group_size <= data.batch_size"
                )
            if not 0 <= st.grouped_fraction <= 1:
                raise ConfigError(f"{where}.grouped_fraction must lie in [0, 1], got {st.grouped_fraction}")
        if self.stop_at is not None and self.stop_at < 1:
            raise ConfigError(f"stop_at must be >= 1 (or null), got {self.stop_at}")
        if self.distributed.strategy == "fsdp" and (self.eval.every or self.eval.at_end):
            # The in-training checks run a forward on rank 0 alone; sharded parameters need every rank in it.
            raise ConfigError(
                f"eval.every={self.eval.every} / eval.at_end={self.eval.at_end} cannot be used with "
                "distributed.strategy=fsdp (the in-training checks run on rank 0 only and would hang): set "
                "eval.every=0 eval.at_end=false and run `qlip eval` on run_dir/last afterwards"
            )
        if self.distributed.strategy == "fsdp" and self.loss.balance.get("mode") == "grad-norm":
            # It differentiates every loss by one transformer weight before the backward pass, and FSDP2 has sharded
            # that block's weights again by then: they are not in the graph.
            raise ConfigError(
                "loss.balance.mode=grad-norm cannot be used with distributed.strategy=fsdp (the layer it "
                "differentiates is sharded again after its forward): use loss.balance.mode=inverse-loss, posthoc or "
                "fixed, or distributed.strategy=ddp"
            )

    # --- conversions ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        options = getattr(self, "task_options", None)
        if options is not None:
            out[task_class(self.task).section] = dataclasses.asdict(options)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


# ---------------------------------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a field's type hint; ints are accepted for floats. Raises ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list (e.g. [a, b]), got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping (e.g. {{key: value}}), got {value!r}")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def merge_into(obj: Any, updates: dict[str, Any], where: str = "") -> Any:
    """Recursively apply a nested dict to a dataclass instance (in place); unknown keys raise ConfigError."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {updates!r}")
    hints = _field_types(type(obj))
    names = [f.name for f in fields(obj)]
    for key, value in updates.items():
        path = f"{where}.{key}" if where else str(key)
        if path in MOVED_KEYS:
            raise ConfigError(f"config key '{path}' is now '{MOVED_KEYS[path]}'; rename it")
        if key not in hints:
            raise ConfigError(f"unknown config key '{path}'; valid keys{' under ' + where if where else ''}: "
                              f"{', '.join(names)}")  # fmt: skip
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            merge_into(current, value, path)
        elif isinstance(current, dict) and isinstance(value, dict):
            merged = dict(current)
            _deep_update(merged, value)
            setattr(obj, key, merged)
        else:
            setattr(obj, key, _coerce(value, hints[key], path))
    return obj


def _deep_update(target: dict[str, Any], updates: dict[str, Any]) -> None:
    for k, v in updates.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            _deep_update(target[k], v)
        else:
            target[k] = v


def parse_override(text: str) -> dict[str, Any]:
    """``"a.b.c=VALUE"`` -> ``{"a": {"b": {"c": VALUE}}}`` with VALUE parsed as a YAML scalar / flow value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.subkey=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from e
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, got {type(data).__name__}")
    return data


def load_config(files: list[str | Path] | str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """defaults <- each YAML file in order (later ones win) <- ``a.b=c`` overrides; then validate.

    Args:
        files: YAML config files / fragments (e.g. the ``balance.yaml`` that ``qlip balance`` writes).
        overrides: ``key.subkey=value`` strings.
    """
    if files is None:
        files = []
    elif isinstance(files, (str, Path)):
        files = [files]
    merged: dict[str, Any] = {}
    for f in files:
        _deep_update(merged, load_yaml(f))
    for text in overrides or []:
        _deep_update(merged, parse_override(text))
    return config_from_dict(merged)


def task_class(name: Any) -> type:
    """The registered Task class called ``name``; ConfigError naming the registered ones otherwise."""
    from .tasks import TASKS

    if not isinstance(name, str) or name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; the registered tasks are {', '.join(sorted(TASKS))}")
    return TASKS[name]


def default_task_options(name: Any) -> Any:
    """The task's own config section with its defaults (None for a task without one)."""
    section_class = task_class(name).section_class
    return section_class() if section_class is not None else None


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """A validated TrainConfig from a (possibly partial) nested dict.

    The chosen task's own section (e.g. ``generator:``) is merged into ``cfg.task_options`` by the same rules as
    every other section; another task's section is an error.
    """
    from .tasks import TASKS

    d = dict(d)
    name = d.get("task", "qlip")
    task = task_class(name)
    own: Any = {}
    for other, cls in TASKS.items():
        if cls.section is not None and cls.section in d:
            if cls is not task:
                raise ConfigError(f"config section '{cls.section}' belongs to task '{other}' and this config trains "
                                  f"task '{name}'; set task={other} or remove the section")  # fmt: skip
            own = d.pop(cls.section)
    cfg = TrainConfig.__new__(TrainConfig)
    for f in fields(TrainConfig):  # defaults without running validation on half-built objects
        setattr(cfg, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
    cfg.task_options = default_task_options(name)
    merge_into(cfg, d)
    if task.section is not None:
        merge_into(cfg.task_options, own if own is not None else {}, task.section)
    cfg.validate()
    return cfg


def split_cli_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Separate YAML files (``*.yaml`` / ``*.yml``) from ``a.b=c`` overrides, keeping their order."""
    files, overrides = [], []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif a.endswith((".yaml", ".yml")):
            files.append(a)
        else:
            raise ConfigError(f"argument {a!r} is neither a .yaml config file nor a key=value override")
    return files, overrides


def check_startup(cfg: TrainConfig) -> None:
    """What a config names that must exist on this machine, checked before a run writes anything.

    ``validate`` judges values alone; this looks at the files and the hardware: the run directory, CUDA, a run
    directory that already holds another task's checkpoints, then what the task checks (QLIP: the data, the model,
    ``init`` and ``data.tokenizer`` paths, a run directory holding another model's checkpoints). Raises ConfigError
    with what to change.
    """
    import torch

    run_dir = Path(cfg.run_dir).expanduser()
    for p in (run_dir, *run_dir.parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == run_dir else f"lies under the file {p}"
            raise ConfigError(f"run_dir={cfg.run_dir} {what}; set run_dir to a folder (a new one, or an earlier "
                              "run's to resume it)")  # fmt: skip
    if cfg.distributed.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("distributed.device=cuda but torch sees no CUDA device on this machine; use "
                          "distributed.device=cpu (or auto)")  # fmt: skip
    if cfg.distributed.starts_workers:
        raise ConfigError(f"distributed.processes={cfg.distributed.processes}: `qlip train` starts the workers, this "
                          f"is one process; run `qlip train`, torchrun, or one process with distributed.processes=1 "
                          f"data.batch_size={cfg.one_process_batch} (the same global batch)")  # fmt: skip
    saved = run_dir / "config.yaml"
    if cfg.resume == "auto" and saved.is_file() and any((run_dir / "checkpoints").glob("step_*.pt")):
        try:
            theirs = load_yaml(saved).get("task", "qlip")
        except ConfigError:
            theirs = cfg.task  # unreadable: the checkpoint itself is checked when it is loaded
        if theirs != cfg.task:
            raise ConfigError(f"run_dir={cfg.run_dir} holds checkpoints of task {theirs!r} and this config trains "
                              f"task {cfg.task!r}; choose a new run_dir, or resume=never to start over there")
    task_class(cfg.task).check_startup(cfg)
