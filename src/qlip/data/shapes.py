"""`shapes`: a built-in procedural image-caption dataset with labels.

Each image holds one or more shapes (circle, square, triangle, star, heart, cross, diamond, hexagon, and the
extras ring and arrow) in a named color, a size class and a position on a 3x3 grid (corners, edges, center), on
a solid, gradient, noisy or textured neutral background. Shapes are drawn at ``antialias`` times the resolution
and box-downsampled, which gives mild anti-aliasing at little cost. Everything about a sample is drawn from a
numpy Generator seeded with (seed, split, index), so a sample is reproducible from its index alone, splits never
share a random stream, and the dataset can be iterated without end.

Difficulty is set by :class:`ShapesConfig`. A measured fact (see docs/data.md): contrastive training on captions
that sometimes drop attributes locks onto color, so the default states every attribute in every caption
(``caption_mode="full"``); ``ShapesConfig.preset("easy")`` is the single-shape, clean-background setting of the
training demo, ``preset("hard")`` adds multi-shape images, textures, rotation and varied captions.

Labels (for zero-shot and linear-probe tasks, see :data:`SHAPES_TASKS`) describe the first shape of the image;
use single-shape configs for classification.

Held-out combinations (opt-in, ``ShapesConfig(holdout_combinations=0.1)``): a fixed share of the (shape, color,
position) triples never appears in the train split, neither drawn nor captioned, so that a model trained on it
can be tested on compositions it never saw (:func:`held_out_combinations` says which;
``eval_combinations="held_out"`` restricts val/test to them). The choice ranks the config's triples by a hash of
their three names, so it depends neither on the seed, nor on the process, nor on the order of the config's lists.
With the default ``holdout_combinations=0.0`` every sample is the same, byte for
byte, as without the option.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import IterableDataset

from .sample import ClassificationTask, Sample, current_slot, resume_point

SHAPE_KINDS = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon", "ring", "arrow")
DEFAULT_SHAPES = SHAPE_KINDS[:8]

# Saturated, well separated hues: backgrounds are neutral grays so a color name always means the shape.
COLOR_RGB = {
    "red": (220, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (40, 165, 60),
    "cyan": (30, 195, 215),
    "blue": (40, 75, 220),
    "purple": (135, 55, 200),
    "pink": (245, 115, 185),
    "brown": (125, 75, 35),
}
DEFAULT_COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")

# Shape diameter as a fraction of the image side.
SIZE_FRACTION = {"small": 0.2, "medium": 0.27, "large": 0.34}

# 3x3 grid: name -> (column, row) and the phrase captions use.
POSITION_CELL = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}  # fmt: skip
POSITION_PHRASE = {
    "top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom", "bottom right": "in the bottom right corner",
}  # fmt: skip
POSITIONS = tuple(POSITION_CELL)
BACKGROUNDS = ("solid", "gradient", "noise", "texture")
SPLITS = {"train": 0, "val": 1, "test": 2}
CAPTION_MODES = ("full", "varied")
EVAL_COMBINATIONS = ("all", "held_out", "seen")
_COUNT_WORDS = ("zero", "one", "two", "three", "four")

# Caption templates that state every attribute ("full"), and extra ones that drop some ("varied").
_FULL_TEMPLATES = (
    "a {size} {color} {shape} {pos}.",
    "a photo of a {size} {color} {shape} {pos}.",
    "there is a {size} {color} {shape} {pos}.",
    "{pos}, a {size} {color} {shape}.",
    "a {size} {shape} {pos}, colored {color}.",
    "a {color} {shape} {pos}. it is {size}.",
)
_DROPPING_TEMPLATES = (
    "a {color} {shape}.",
    "a {shape} {pos}.",
    "a {size} {shape}.",
    "a {color} shape {pos}.",
    "a drawing of a {shape}.",
    "a {size} {color} {shape}.",
    "something {color} {pos}.",
)
_FULL_PARTS = "{size} {color} {shape} {pos}"
_DROPPING_PARTS = ("{color} {shape}", "{size} {shape} {pos}", "{shape} {pos}", "{color} {shape} {pos}")


@dataclass
class ShapesConfig:
    """How `shapes` images and captions are made; every field changes the difficulty.

    Attributes:
        image_size: side length in pixels (32 to 256).
        shapes: shape kinds to draw (from SHAPE_KINDS).
        colors: color names (from COLOR_RGB).
        sizes: size classes (from SIZE_FRACTION).
        positions: grid positions (from POSITIONS).
        backgrounds: background kinds (from BACKGROUNDS), drawn uniformly.
        max_shapes: most shapes per image (each on its own grid cell).
        multi_shape_prob: probability that an image has more than one shape (when max_shapes > 1).
        position_jitter: random offset of a shape's center, as a fraction of the side.
        size_jitter: relative random change of a shape's size.
        rotation_deg: shapes are rotated uniformly in [-rotation_deg, rotation_deg].
        color_jitter: per-channel random change of a shape's color, in 8-bit levels.
        noise_std: pixel noise of the "noise" background, as a fraction of 255.
        caption_mode: "full" (every caption states shape, color, size and position of every shape) or "varied"
            (templates that may drop attributes).
        antialias: supersampling factor for drawing (1 = aliased).
        holdout_combinations: share of the (shape, color, position) triples kept out of the train split (0 to
            0.5; 0 = none, the default); see :func:`held_out_combinations`.
        eval_combinations: what the val and test splits draw when triples are held out: "all" (the same samples
            as without holdout), "held_out" (only held-out triples: composition) or "seen" (only training triples).
    """

    image_size: int = 64
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    colors: tuple[str, ...] = DEFAULT_COLORS
    sizes: tuple[str, ...] = ("small", "large")
    positions: tuple[str, ...] = POSITIONS
    backgrounds: tuple[str, ...] = ("solid", "gradient", "noise")
    max_shapes: int = 1
    multi_shape_prob: float = 0.0
    position_jitter: float = 0.03
    size_jitter: float = 0.1
    rotation_deg: float = 10.0
    color_jitter: int = 12
    noise_std: float = 0.04
    caption_mode: str = "full"
    antialias: int = 4
    holdout_combinations: float = 0.0
    eval_combinations: str = "all"

    def __post_init__(self) -> None:
        for name in ("shapes", "colors", "sizes", "positions", "backgrounds"):
            setattr(self, name, tuple(getattr(self, name)))
        if not 32 <= self.image_size <= 256:
            raise ValueError(f"shapes image_size must be within 32..256, got {self.image_size}")
        for name, allowed in (("shapes", SHAPE_KINDS), ("colors", COLOR_RGB), ("sizes", SIZE_FRACTION),
                              ("positions", POSITION_CELL), ("backgrounds", BACKGROUNDS)):
            values = getattr(self, name)
            unknown = [v for v in values if v not in allowed]
            if not values or unknown or len(set(values)) != len(values):
                raise ValueError(f"ShapesConfig.{name}={values!r}: need distinct values from {tuple(allowed)}")
        if not 1 <= self.max_shapes <= min(4, len(self.positions)):
            raise ValueError(f"max_shapes must be in 1..{min(4, len(self.positions))}, got {self.max_shapes}")
        if self.caption_mode not in CAPTION_MODES:
            raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, got {self.caption_mode!r}")
        if not 1 <= self.antialias <= 8:
            raise ValueError(f"antialias must be in 1..8, got {self.antialias}")
        if not 0.0 <= self.holdout_combinations <= 0.5:
            raise ValueError(f"holdout_combinations must be a share in 0..0.5, got {self.holdout_combinations}")
        if self.eval_combinations not in EVAL_COMBINATIONS:
            raise ValueError(f"eval_combinations must be one of {EVAL_COMBINATIONS}, got {self.eval_combinations!r}")
        if self.eval_combinations != "all" and not self.holdout_combinations:
            raise ValueError(f"eval_combinations={self.eval_combinations!r} needs held-out triples: set "
                             "holdout_combinations (e.g. 0.1)")  # fmt: skip
        if self.holdout_combinations:
            held_out_combinations(self)  # fail now if the share cannot be held out

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ShapesConfig:
        """A named difficulty: "easy" (demo), "default" or "hard"; keyword arguments override fields."""
        presets = {
            # Medium/large only: a "small" shape is ~13 px at 64x64, where star, hexagon and circle blur together.
            "easy": dict(sizes=("medium", "large"), backgrounds=("solid",), rotation_deg=0.0, position_jitter=0.02,
                         size_jitter=0.05),  # fmt: skip
            "default": {},
            "hard": dict(
                sizes=("small", "medium", "large"), backgrounds=BACKGROUNDS, max_shapes=3, multi_shape_prob=0.5,
                rotation_deg=25.0, caption_mode="varied", noise_std=0.06,
            ),
        }
        if name not in presets:
            raise ValueError(f"unknown shapes preset {name!r}; choose one of {tuple(presets)}")
        return cls(**{**presets[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shapes_tasks(config: ShapesConfig | None = None) -> dict[str, ClassificationTask]:
    """Class names and prompt templates of every labelled task of a `shapes` configuration."""
    cfg = config or ShapesConfig()
    tasks = {
        "shape": ClassificationTask(
            cfg.shapes, ("a {}.", "a photo of a {}.", "a drawing of a {}.", "a {} shape."), "shape"
        ),
        "color": ClassificationTask(cfg.colors, ("a {} shape.", "a photo of a {} shape.", "something {}."), "color"),
        "position": ClassificationTask(
            tuple(POSITION_PHRASE[p] for p in cfg.positions), ("a shape {}.", "a photo of a shape {}."), "position"
        ),
        "size": ClassificationTask(cfg.sizes, ("a {} shape.", "a photo of a {} shape."), "size"),
        "color_shape": ClassificationTask(
            tuple(f"{c} {s}" for c in cfg.colors for s in cfg.shapes), ("a {}.", "a photo of a {}."), "color_shape"
        ),
    }
    if cfg.max_shapes > 1:
        tasks["count"] = ClassificationTask(_COUNT_WORDS[1 : cfg.max_shapes + 1], ("{} shapes.",), "count")
    return tasks


SHAPES_TASKS: dict[str, ClassificationTask] = shapes_tasks(ShapesConfig())


def _unit_outline(kind: str, steps: int = 40) -> list[np.ndarray]:
    """Polygons of a shape centered on 0 with radius about 1 (image axes: y points down); later ones are holes."""
    if kind in ("circle", "ring"):
        t = np.linspace(0, 2 * np.pi, steps, endpoint=False)
        circle = np.stack([np.cos(t), np.sin(t)], axis=1)
        return [circle, circle * 0.55] if kind == "ring" else [circle]
    if kind == "square":
        return [np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])]
    if kind == "triangle":
        a = np.deg2rad([-90, 30, 150])
        return [np.stack([np.cos(a), np.sin(a) + 0.25], axis=1)]
    if kind == "diamond":
        return [np.array([[0, -1], [0.65, 0], [0, 1], [-0.65, 0]], dtype=float)]
    if kind == "hexagon":
        a = np.deg2rad(np.arange(6) * 60)
        return [np.stack([np.cos(a), np.sin(a)], axis=1) * 0.95]
    if kind == "star":
        a = np.deg2rad(-90 + np.arange(10) * 36)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return [np.stack([r * np.cos(a), r * np.sin(a) + 0.08], axis=1)]
    if kind == "cross":
        w, e = 0.3, 0.95
        return [np.array([[-w, -e], [w, -e], [w, -w], [e, -w], [e, w], [w, w], [w, e], [-w, e], [-w, w], [-e, w],
                          [-e, -w], [-w, -w]])]  # fmt: skip
    if kind == "heart":
        t = np.linspace(0, 2 * np.pi, steps, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [np.stack([x, y + 1.5], axis=1) / 16.5]
    if kind == "arrow":
        return [np.array([[-0.95, -0.22], [0.15, -0.22], [0.15, -0.6], [0.95, 0], [0.15, 0.6], [0.15, 0.22],
                          [-0.95, 0.22]])]  # fmt: skip
    raise ValueError(f"unknown shape kind {kind!r}; choose from {SHAPE_KINDS}")


_OUTLINES = {kind: _unit_outline(kind) for kind in SHAPE_KINDS}


def _background(kind: str, size: int, cfg: ShapesConfig, rng: np.random.Generator) -> np.ndarray:
    """A neutral (gray, lightly tinted) background as float32 (S, S, 3) in 0..255."""
    level = rng.uniform(0.12, 0.92) * 255
    tint = rng.uniform(-8, 8, size=3)
    base = (level + tint).astype(np.float32)
    if kind == "solid":
        return np.broadcast_to(base, (size, size, 3)).copy()
    if kind == "gradient":
        other = (rng.uniform(0.12, 0.92) * 255 + rng.uniform(-8, 8, size=3)).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        coords = np.linspace(-0.5, 0.5, size, dtype=np.float32)
        ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
        return base + ramp[..., None] * (other - base)
    if kind == "noise":
        noise = rng.standard_normal((size, size, 3), dtype=np.float32) * (cfg.noise_std * 255)
        return base + noise
    # texture: faint stripes or checkerboard
    period = int(rng.integers(3, 9)) * max(1, size // 64)
    idx = np.arange(size)
    if rng.random() < 0.5:
        pattern = ((idx[None, :] + idx[:, None]) // period) % 2
    else:
        pattern = ((idx[None, :] // period) + (idx[:, None] // period)) % 2
    return base + (pattern[..., None].astype(np.float32) - 0.5) * rng.uniform(10, 22)


def _draw_shape(canvas: np.ndarray, shape: dict[str, Any], cfg: ShapesConfig) -> None:
    """Alpha-blend one anti-aliased shape into ``canvas`` (S, S, 3) float32, touching only its bounding box."""
    size, aa = canvas.shape[0], cfg.antialias
    cx, cy = shape["center"][0] * size, shape["center"][1] * size
    radius = shape["diameter"] * size / 2
    left, top = max(int(math.floor(cx - radius - 1)), 0), max(int(math.floor(cy - radius - 1)), 0)
    right, bottom = min(int(math.ceil(cx + radius + 1)), size), min(int(math.ceil(cy + radius + 1)), size)
    if right <= left or bottom <= top:
        return
    theta = np.deg2rad(shape["rotation"])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    mask = Image.new("L", ((right - left) * aa, (bottom - top) * aa), 0)
    draw = ImageDraw.Draw(mask)
    for i, poly in enumerate(_OUTLINES[shape["shape"]]):
        pts = (poly @ rot.T) * radius + np.array([cx - left, cy - top])
        draw.polygon([tuple(p) for p in (pts * aa).tolist()], fill=0 if i else 255)
    if aa > 1:
        mask = mask.reduce(aa)  # box filter: the mean coverage of each output pixel
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    region = canvas[top:bottom, left:right]
    region += alpha * (np.asarray(shape["rgb"], dtype=np.float32) - region)


def _describe(shape: dict[str, Any], parts: str) -> str:
    return parts.format(size=shape["size"], color=shape["color"], shape=shape["shape"],
                        pos=POSITION_PHRASE[shape["position"]]).strip()  # fmt: skip


def make_caption(shapes: list[dict[str, Any]], mode: str, rng: np.random.Generator) -> str:
    """A caption for the shapes of one image; in "full" mode it states every attribute of every shape."""
    if len(shapes) == 1:
        templates = _FULL_TEMPLATES if mode == "full" else _FULL_TEMPLATES + _DROPPING_TEMPLATES
        template = templates[int(rng.integers(len(templates)))]
        s = shapes[0]
        text = template.format(size=s["size"], color=s["color"], shape=s["shape"], pos=POSITION_PHRASE[s["position"]])
        return text[0].lower() + text[1:]
    if mode == "full":
        parts = [_describe(s, _FULL_PARTS) for s in shapes]
    else:
        parts = [_describe(s, _DROPPING_PARTS[int(rng.integers(len(_DROPPING_PARTS)))]) for s in shapes]
    listed = ", a ".join(parts[:-1]) + " and a " + parts[-1]
    return f"{_COUNT_WORDS[len(shapes)]} shapes: a {listed}."


Triple = tuple[str, str, str]  # (shape, color, position)


def _triple_rank(triple: Triple) -> bytes:
    return hashlib.sha256("|".join(triple).encode()).digest()


@lru_cache(maxsize=64)
def _held_out(shapes: tuple[str, ...], colors: tuple[str, ...], positions: tuple[str, ...],
              share: float) -> tuple[Triple, ...]:  # fmt: skip
    triples = sorted(((s, c, p) for s in shapes for c in colors for p in positions), key=_triple_rank)
    want = max(1, round(share * len(triples)))
    # Keep at least one training triple for every shape, color and position, so that each attribute of a
    # held-out triple is learnt from other combinations.
    left = [{}, {}, {}]
    for triple in triples:
        for axis, value in enumerate(triple):
            left[axis][value] = left[axis].get(value, 0) + 1
    chosen: list[Triple] = []
    for triple in triples:
        if len(chosen) == want:
            break
        if all(left[axis][value] > 1 for axis, value in enumerate(triple)):
            chosen.append(triple)
            for axis, value in enumerate(triple):
                left[axis][value] -= 1
    if len(chosen) < want:
        raise ValueError(f"holdout_combinations={share} cannot hold out {want} of {len(triples)} triples while "
                         "every shape, color and position keeps a training triple; use a smaller share")  # fmt: skip
    return tuple(sorted(chosen, key=lambda t: (shapes.index(t[0]), colors.index(t[1]), positions.index(t[2]))))


def held_out_combinations(config: ShapesConfig) -> tuple[Triple, ...]:
    """The (shape, color, position) triples that the train split of ``config`` never draws nor captions.

    ``round(holdout_combinations * n)`` of the config's n triples (at least one when the share is not 0): the
    triples ranked first by the SHA-256 of ``"shape|color|position"``, skipping any whose removal would leave a
    shape, a color or a position without a training triple. Empty when ``holdout_combinations`` is 0.
    """
    if not config.holdout_combinations:
        return ()
    return _held_out(config.shapes, config.colors, config.positions, float(config.holdout_combinations))


@lru_cache(maxsize=64)
def _allowed_triples(shapes: tuple[str, ...], colors: tuple[str, ...], positions: tuple[str, ...], share: float,
                     kind: str) -> tuple[Triple, ...]:  # fmt: skip
    held = set(_held_out(shapes, colors, positions, share))
    every = [(s, c, p) for p in positions for c in colors for s in shapes]
    return tuple(t for t in every if (t in held) == (kind == "held_out"))


def split_triples(config: ShapesConfig, split: str) -> tuple[Triple, ...] | None:
    """The triples ``split`` draws from, or None when it draws every triple the plain way (no restriction)."""
    if not config.holdout_combinations:
        return None
    kind = "seen" if split == "train" else config.eval_combinations
    if kind == "all":
        return None
    return _allowed_triples(config.shapes, config.colors, config.positions, float(config.holdout_combinations),
                            kind)  # fmt: skip


def _pick_triples(allowed: tuple[Triple, ...], count: int, rng: np.random.Generator) -> list[Triple]:
    """Up to ``count`` triples drawn uniformly from ``allowed``, each on its own position."""
    picks: list[Triple] = []
    for _ in range(count):
        free = [t for t in allowed if all(t[2] != p[2] for p in picks)] if picks else allowed
        if not free:
            break
        picks.append(free[int(rng.integers(len(free)))])
    return picks


def _sample_shapes(cfg: ShapesConfig, rng: np.random.Generator, split: str = "train") -> list[dict[str, Any]]:
    count = 1
    if cfg.max_shapes > 1 and rng.random() < cfg.multi_shape_prob:
        count = int(rng.integers(2, cfg.max_shapes + 1))
    allowed = split_triples(cfg, split)
    if allowed is None:
        cells = rng.choice(len(cfg.positions), size=count, replace=False)
        picks = None
        positions = [cfg.positions[int(cell)] for cell in cells]
    else:
        picks = _pick_triples(allowed, count, rng)
        positions = [p for _, _, p in picks]
    shapes = []
    for i, position in enumerate(positions):
        col, row = POSITION_CELL[position]
        size_name = cfg.sizes[int(rng.integers(len(cfg.sizes)))]
        diameter = SIZE_FRACTION[size_name] * (1 + rng.uniform(-cfg.size_jitter, cfg.size_jitter))
        # Cell centers sit at 1/6, 1/2, 5/6 of the side; jitter, then keep the whole shape inside the image.
        half = diameter / 2
        cx = float(np.clip((2 * col + 1) / 6 + rng.uniform(-1, 1) * cfg.position_jitter, half, 1 - half))
        cy = float(np.clip((2 * row + 1) / 6 + rng.uniform(-1, 1) * cfg.position_jitter, half, 1 - half))
        color = cfg.colors[int(rng.integers(len(cfg.colors)))] if picks is None else picks[i][1]
        rgb = np.clip(np.array(COLOR_RGB[color]) + rng.integers(-cfg.color_jitter, cfg.color_jitter + 1, 3), 0, 255)
        kind = cfg.shapes[int(rng.integers(len(cfg.shapes)))] if picks is None else picks[i][0]
        shapes.append({
            "shape": kind, "color": color, "size": size_name,
            "position": position, "center": (cx, cy), "diameter": float(diameter),
            "rotation": float(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg)), "rgb": tuple(int(v) for v in rgb),
        })  # fmt: skip
    return shapes


def _sample_rng(index: int, split: str, seed: int) -> np.random.Generator:
    """The generator of sample ``index``: every draw of a sample comes from it, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {tuple(SPLITS)}")
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    return np.random.default_rng([seed, SPLITS[split], index])


def shapes_attributes(index: int, config: ShapesConfig | None = None, *, split: str = "train",
                      seed: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """The shapes (kind, color, size, position, ...) of sample ``index``, without rendering its image.

    Equal to ``generate_shapes_sample(index, config, split=split, seed=seed)["attributes"]["shapes"]`` at a
    fraction of the cost (microseconds), for whoever orders samples by their content (hard-negative batches).
    """
    return _sample_shapes(config or ShapesConfig(), _sample_rng(index, split, seed), split)


def generate_shapes_sample(index: int, config: ShapesConfig | None = None, *, split: str = "train",
                           seed: int = 0) -> Sample:  # fmt: skip
    """The `shapes` sample number ``index`` of ``split``: deterministic from (seed, split, index).

    Returns:
        ``{"image", "caption", "label", "key", "labels", "attributes"}``; ``label`` is the shape class,
        ``labels`` maps each task of :func:`shapes_tasks` to its class index (of the first shape).
    """
    cfg = config or ShapesConfig()
    rng = _sample_rng(index, split, seed)
    shapes = _sample_shapes(cfg, rng, split)
    background = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    canvas = _background(background, cfg.image_size, cfg, rng)
    for shape in shapes:
        _draw_shape(canvas, shape, cfg)
    image = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
    caption = make_caption(shapes, cfg.caption_mode, rng)
    first = shapes[0]
    labels = {
        "shape": cfg.shapes.index(first["shape"]),
        "color": cfg.colors.index(first["color"]),
        "position": cfg.positions.index(first["position"]),
        "size": cfg.sizes.index(first["size"]),
        "color_shape": cfg.colors.index(first["color"]) * len(cfg.shapes) + cfg.shapes.index(first["shape"]),
    }
    if cfg.max_shapes > 1:
        labels["count"] = len(shapes) - 1
    attributes = {"shapes": shapes, "background": background}
    key = f"shapes-{split}-{index:09d}"
    return {"image": image, "caption": caption, "label": labels["shape"], "key": key, "labels": labels,
            "attributes": attributes}  # fmt: skip


@dataclass
class ShapesDataset(IterableDataset):
    """The `shapes` stream: endless (``length=None``) or ``length`` samples; also indexable.

    Iteration splits indices across distributed ranks and DataLoader workers (slot s of n reads indices
    s, s + n, s + 2n, ...) and tags each sample with its stream position, so a :class:`StreamTracker` state can
    resume it exactly (see :meth:`load_state_dict`).

    Attributes:
        config: how images and captions are made.
        split: "train", "val" or "test" (independent random streams).
        seed: base seed.
        length: number of samples (one pass), or None for an endless stream.
        rank: distributed rank (defaults to torch.distributed's, else 0).
        world_size: number of ranks (defaults to torch.distributed's, else 1).
    """

    config: ShapesConfig = field(default_factory=ShapesConfig)
    split: str = "train"
    seed: int = 0
    length: int | None = None
    rank: int | None = None
    world_size: int | None = None

    def __post_init__(self) -> None:
        super().__init__()
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; choose one of {tuple(SPLITS)}")
        self._resume: dict[str, Any] | None = None

    @property
    def tasks(self) -> dict[str, ClassificationTask]:
        return shapes_tasks(self.config)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("this shapes stream is endless (length=None); give a length to make it sized")
        return self.length

    def __getitem__(self, index: int) -> Sample:
        if self.length is not None and not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} shapes samples")
        return generate_shapes_sample(index, self.config, split=self.split, seed=self.seed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a :class:`StreamTracker` state at the next iteration."""
        self._resume = state

    def __iter__(self) -> Iterator[Sample]:
        slot, num_slots = current_slot(self.rank, self.world_size)
        point = resume_point(self._resume, slot, num_slots)
        emitted = point[1] if point else 0
        while True:
            index = slot + emitted * num_slots
            if self.length is not None and index >= self.length:
                return
            sample = self[index]
            emitted += 1
            sample["position"] = (slot, num_slots, 0, emitted)
            yield sample

