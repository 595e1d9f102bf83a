"""The ShapesEval judge: a small supervised CNN that reads shape, color and position off a `shapes` image.

It is independent of any QLIP model (trained from labels only, on real procedural images), so that it can grade
what a generator drew without sharing the generator's tokenizer or its mistakes. Three linear heads (one per
attribute) sit on a four-block convolutional trunk whose last feature map keeps a 4x4 layout (position needs it).

A judge directory holds ``config.json`` (architecture, class names, the data and training settings that made it)
and ``model.safetensors``; :func:`train_judge` writes both and ``judge.json`` (its held-out accuracy and training
time), :func:`load_judge` reads them back. Training is seeded: the same call on the same torch version and thread
count gives the same weights.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..data.shapes import ShapesConfig, generate_shapes_sample
from ..fileio import replace_files, write_json_atomic
from ..inference import cpu_name

logger = logging.getLogger(__name__)

ATTRIBUTES = ("shape", "color", "position")
JUDGE_CONFIG = "config.json"
JUDGE_WEIGHTS = "model.safetensors"
JUDGE_REPORT = "judge.json"
JUDGE_KIND = "qlip-shapes-judge"


def demo_shapes_config(**overrides: Any) -> ShapesConfig:
    """The shapes the tokenizer demo trains on (configs/shapes-tiny.yaml: preset "easy", large shapes, 64x64)."""
    return ShapesConfig.preset("easy", **{"sizes": ("large",), **overrides})


@dataclass
class JudgeConfig:
    """Architecture and classes of a judge.

    Attributes:
        image_size: side length the trunk reads (other sizes are resized to it).
        channels: output channels of the four convolution blocks (each halves the side).
        classes: attribute -> class names, in head order (from the shapes config it was trained on).
        shapes: the ShapesConfig fields of its training data (for the record).
        training: steps, seed, batch size, ... of :func:`train_judge` (for the record).
    """

    image_size: int = 64
    channels: tuple[int, ...] = (16, 24, 32, 32)
    classes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    shapes: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.classes = {k: tuple(v) for k, v in self.classes.items()}
        if len(self.channels) != 4 or self.image_size % 16:
            raise ValueError(f"a judge needs 4 channel counts and an image_size divisible by 16, got "
                             f"{self.channels} and {self.image_size}")  # fmt: skip
        missing = [a for a in ATTRIBUTES if not self.classes.get(a)]
        if missing:
            raise ValueError(f"judge classes lack {missing}; need class names for each of {ATTRIBUTES}")


class ShapesJudge(nn.Module):
    """Conv trunk (4 blocks of conv-BN-ReLU-maxpool) -> flat (C, S/16, S/16) map -> one linear head per attribute."""

    def __init__(self, cfg: JudgeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        blocks: list[nn.Module] = []
        width = 3
        for out in cfg.channels:
            blocks += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            width = out
        self.trunk = nn.Sequential(*blocks)
        features = width * (cfg.image_size // 16) ** 2
        self.heads = nn.ModuleDict({a: nn.Linear(features, len(cfg.classes[a])) for a in ATTRIBUTES})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """uint8 or [0, 255] float images (B, 3, S, S) -> attribute -> logits (B, classes)."""
        h = self.trunk((x.float() - 127.5) / 64.0).flatten(1)  # (B, C * (S/16)^2)
        return {a: head(h) for a, head in self.heads.items()}

    def as_tensor(self, images: Sequence[Image.Image] | Tensor) -> Tensor:
        """PIL images or a uint8 (B, 3, H, W) tensor -> uint8 (B, 3, S, S) at the judge's size."""
        size = self.cfg.image_size
        if isinstance(images, Tensor):
            if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
                raise ValueError(f"the judge reads uint8 images shaped (B, 3, H, W), got {images.dtype} "
                                 f"{tuple(images.shape)}")  # fmt: skip
            if images.shape[-2:] == (size, size):
                return images.cpu()
            images = [Image.fromarray(a) for a in images.permute(0, 2, 3, 1).cpu().numpy()]
        arrays = []
        for img in images:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(img))
        if not arrays:
            return torch.zeros(0, 3, size, size, dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def predict_indices(self, images: Sequence[Image.Image] | Tensor, batch_size: int = 256) -> dict[str, Tensor]:
        """attribute -> predicted class index (B,)."""
        was_training = self.training
        self.eval()
        x = self.as_tensor(images)
        device = next(self.parameters()).device
        outs: dict[str, list[Tensor]] = {a: [] for a in ATTRIBUTES}
        for start in range(0, len(x), batch_size):
            logits = self(x[start : start + batch_size].to(device))
            for a in ATTRIBUTES:
                outs[a].append(logits[a].argmax(-1).cpu())
        self.train(was_training)
        return {a: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for a, v in outs.items()}

    def predict(self, images: Sequence[Image.Image] | Tensor, batch_size: int = 256) -> list[dict[str, str]]:
        """The judge's reading of each image: ``[{"shape": "circle", "color": "red", "position": "top left"}, ...]``."""
        idx = self.predict_indices(images, batch_size)
        names = self.cfg.classes
        return [{a: names[a][int(idx[a][i])] for a in ATTRIBUTES} for i in range(len(idx["shape"]))]


def shapes_images(config: ShapesConfig, count: int, *, split: str, seed: int = 0,
                  start: int = 0) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """``count`` real shapes images as uint8 (N, 3, S, S) and attribute -> class index (N,) of ``config``."""
    images, labels = [], {a: [] for a in ATTRIBUTES}
    for i in range(start, start + count):
        sample = generate_shapes_sample(i, config, split=split, seed=seed)
        images.append(np.asarray(sample["image"]))
        for a in ATTRIBUTES:
            labels[a].append(sample["labels"][a])
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, {a: torch.tensor(v) for a, v in labels.items()}


def judge_accuracy(judge: ShapesJudge, images: Sequence[Image.Image] | Tensor,
                   labels: dict[str, Sequence[str]]) -> dict[str, float]:  # fmt: skip
    """Percent of images whose attribute the judge reads right, per attribute and for all three (``all``).

    Args:
        judge: the judge.
        images: PIL images or uint8 (B, 3, H, W).
        labels: attribute -> class name of each image.
    """
    predicted = judge.predict(images)
    if any(len(labels[a]) != len(predicted) for a in ATTRIBUTES):
        raise ValueError(f"got {len(predicted)} images but {[len(labels[a]) for a in ATTRIBUTES]} labels")
    if not predicted:
        raise ValueError("judge_accuracy needs at least one image")
    right = {a: [p[a] == labels[a][i] for i, p in enumerate(predicted)] for a in ATTRIBUTES}
    out = {a: 100.0 * float(np.mean(right[a])) for a in ATTRIBUTES}
    out["all"] = 100.0 * float(np.mean([all(right[a][i] for a in ATTRIBUTES) for i in range(len(predicted))]))
    return out


def label_names(config: ShapesConfig, labels: dict[str, Tensor]) -> dict[str, list[str]]:
    """Class indices of ``config`` (attribute -> (N,), as :func:`shapes_images` gives) -> class names."""
    classes = {"shape": config.shapes, "color": config.colors, "position": config.positions}
    return {a: [classes[a][int(i)] for i in labels[a]] for a in ATTRIBUTES}


def train_judge(out_dir: str | Path | None, *, steps: int = 1500, seed: int = 0, num_train: int = 6000,
                num_eval: int = 2000, batch_size: int = 64, lr: float = 3e-3, noise: float = 6.0, blur: float = 1.5,
                shapes: ShapesConfig | None = None, eval_shapes: ShapesConfig | None = None,
                channels: Sequence[int] = (16, 24, 32, 32),
                command: str | None = None) -> tuple[ShapesJudge, dict[str, Any]]:  # fmt: skip
    """Train a judge on real shapes images (train split) and measure it on held-out ones (test split).

    The training set is ``num_train`` images drawn once; each step reads a seeded random batch, blurred by a
    Gaussian of up to ``blur`` pixels and with Gaussian pixel noise of up to ``noise`` levels, so that the judge
    reads decoded images (softer and grainier than the originals) as well as real ones.
    AdamW with a cosine schedule. Everything is seeded by ``seed``.

    Args:
        out_dir: where to write config.json, model.safetensors and judge.json (None: write nothing).
        steps: optimizer steps.
        seed: seeds the weights, the batches, the noise and the shapes samples.
        num_train: training images (train split).
        num_eval: held-out images (test split) for the reported accuracy.
        batch_size: images per step.
        lr: peak learning rate.
        noise: largest pixel-noise standard deviation of the augmentation, in 8-bit levels.
        blur: largest Gaussian-blur standard deviation of the augmentation, in pixels.
        shapes: the data it learns from (default: preset "easy", medium and large shapes, which covers the demo's).
        eval_shapes: the data of the reported accuracy (default: the demo's, :func:`demo_shapes_config`).
        channels: the four block widths.
        command: the command line that made it, recorded in judge.json.

    Returns:
        The judge (in eval mode) and the judge.json payload: ``accuracy`` (percent per attribute and ``all`` on
        ``num_eval`` held-out images), ``train_seconds``, ``hardware``, the settings.
    """
    if steps < 1 or num_train < 1 or num_eval < 1 or batch_size < 1:
        raise ValueError(f"steps, num_train, num_eval and batch_size must be >= 1, got {steps}, {num_train}, "
                         f"{num_eval}, {batch_size}")  # fmt: skip
    train_cfg = shapes or ShapesConfig.preset("easy")
    eval_cfg = eval_shapes or demo_shapes_config(image_size=train_cfg.image_size)
    for name in ("shapes", "colors", "positions"):
        if getattr(eval_cfg, name) != getattr(train_cfg, name):
            raise ValueError(f"the eval shapes must use the training classes: {name} differ")
    settings = dict(steps=steps, seed=seed, num_train=num_train, num_eval=num_eval, batch_size=batch_size, lr=lr,
                    noise=noise, blur=blur, optimizer="adamw", schedule="cosine",
                    threads=torch.get_num_threads())  # fmt: skip
    cfg = JudgeConfig(image_size=train_cfg.image_size, channels=tuple(channels),
                      classes={"shape": train_cfg.shapes, "color": train_cfg.colors, "position": train_cfg.positions},
                      shapes=train_cfg.to_dict(), training=settings)  # fmt: skip
    if out_dir is not None:
        check_judge_target(out_dir)  # before the minutes of training, not after
    torch.manual_seed(seed)
    judge = ShapesJudge(cfg)
    start = time.perf_counter()
    x, y = shapes_images(train_cfg, num_train, split="train", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    judge.train()
    for step in range(steps):
        idx = torch.randint(0, num_train, (batch_size,), generator=gen)
        batch = x[idx].float()
        batch = _blur(batch, float(torch.rand((), generator=gen)) * blur)
        sigma = torch.rand(batch_size, 1, 1, 1, generator=gen) * noise
        batch = (batch + sigma * torch.randn(batch.shape, generator=gen)).clamp(0, 255)
        logits = judge(batch)
        loss = sum(F.cross_entropy(logits[a], y[a][idx]) for a in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("judge step %d/%d loss %.4f", step + 1, steps, float(loss.detach()))
    judge.eval()
    train_seconds = time.perf_counter() - start
    xe, ye = shapes_images(eval_cfg, num_eval, split="test", seed=seed)
    accuracy = judge_accuracy(judge, xe, label_names(eval_cfg, ye))
    report = {
        "accuracy": accuracy,
        "accuracy_on": {"split": "test", "num_images": num_eval, "shapes": eval_cfg.to_dict()},
        "train_seconds": round(train_seconds, 1),
        "hardware": {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "parameters": sum(p.numel() for p in judge.parameters()),
        "settings": settings,
        "command": command,
    }
    if out_dir is not None:
        save_judge(judge, out_dir, report)
    return judge, report


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of (B, 3, H, W) with standard deviation ``sigma`` pixels (none below 0.1)."""
    if sigma < 0.1:
        return x
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)  # rows
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)  # columns


def check_judge_target(out_dir: str | Path) -> None:
    """Refuse a folder whose config.json or model.safetensors a judge would replace but did not write.

    Raises:
        FileExistsError: ``out_dir`` is a file, or holds another kind of config.json / model.safetensors.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; name a folder for the judge")
    config = out / JUDGE_CONFIG
    ours = False
    if config.is_file():
        try:
            ours = json.loads(config.read_text(encoding="utf-8")).get("kind") == JUDGE_KIND
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            ours = False
    if not ours and (config.exists() or (out / JUDGE_WEIGHTS).exists()):
        raise FileExistsError(f"{out} holds a {JUDGE_CONFIG} or {JUDGE_WEIGHTS} that is not a ShapesEval judge's; "
                              "choose a new or empty folder for the judge")  # fmt: skip


def save_judge(judge: ShapesJudge, out_dir: str | Path, report: dict[str, Any] | None = None) -> Path:
    """Write config.json, model.safetensors (and judge.json when given) into ``out_dir``, together and atomically.

    ``out_dir`` may be new, empty, a judge folder (its judge files are replaced) or hold other files (kept).

    Raises:
        FileExistsError: see :func:`check_judge_target`.
    """
    out = Path(out_dir)
    check_judge_target(out)
    cfg = judge.cfg
    payload = {"kind": JUDGE_KIND, "image_size": cfg.image_size, "channels": list(cfg.channels),
               "classes": {a: list(v) for a, v in cfg.classes.items()}, "shapes": cfg.shapes,
               "training": cfg.training}  # fmt: skip
    state = {k: v.detach().cpu().contiguous() for k, v in judge.state_dict().items()}
    with replace_files(out, prefix=".judge-", last=(JUDGE_CONFIG,)) as stage:
        save_file(state, str(stage / JUDGE_WEIGHTS), metadata={"format": "pt", "qlip": JUDGE_KIND})
        write_json_atomic(stage / JUDGE_CONFIG, payload)
        if report is not None:
            write_json_atomic(stage / JUDGE_REPORT, report)
    return out


def load_judge(directory: str | Path, device: str | torch.device = "cpu") -> ShapesJudge:
    """The judge saved in ``directory`` by :func:`train_judge`, in eval mode.

    Raises:
        FileNotFoundError: the folder or one of its two files is missing (the message says how to make one).
        ValueError: config.json is not a judge's or the weights do not fit it.
    """
    d = Path(directory)
    for name in (JUDGE_CONFIG, JUDGE_WEIGHTS):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d} holds no ShapesEval judge ({name} is missing); make one with `qlip eval "
                                    "train-judge --out DIR` or qlip.eval.judge.train_judge(DIR)")  # fmt: skip
    try:
        raw = json.loads((d / JUDGE_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{d / JUDGE_CONFIG} is not readable JSON ({e}); retrain the judge") from e
    if not isinstance(raw, dict) or raw.get("kind") != JUDGE_KIND:
        raise ValueError(f"{d / JUDGE_CONFIG} is not a ShapesEval judge config (kind must be {JUDGE_KIND!r})")
    cfg = JudgeConfig(image_size=int(raw["image_size"]), channels=tuple(raw["channels"]), classes=raw["classes"],
                      shapes=raw.get("shapes", {}), training=raw.get("training", {}))  # fmt: skip
    judge = ShapesJudge(cfg)
    try:
        judge.load_state_dict(load_file(str(d / JUDGE_WEIGHTS)))
    except Exception as e:  # a truncated file, a foreign one, or weights of another architecture
        raise ValueError(f"{d / JUDGE_WEIGHTS} does not fit its config.json ({e}); retrain the judge") from e
    return judge.to(device).eval()
