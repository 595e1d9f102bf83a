"""The vision-language model (LLaVA-style): a QLIP vision tower, a projector and a causal language model.

    image --QLIP encoder--> features of one block (default -2, before the quantizer) (B, N, C)
          --projector (linear | mlp2x_gelu)--> (B, N, W) spliced into the prompt at the ``<image>`` placeholder
    [prompt before <image>] [N image positions] [prompt after] [answer] <eos>  --language model--> loss on the answer

The language model and its tokenizer are slots (:mod:`qlip.understanding.protocols`): the package's own
:class:`qlip.ar.ARTransformer` with a word tokenizer ("qlip-ar"), or a pretrained LM wrapper ("hf", ``source``).
Conversations are lists of (user text, answer) turns; the chat template is the tokenizer's ``chat_prompt``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..ar.sampling import Chooser
from .errors import UnderstandingError

IMAGE_TOKEN = "<image>"
FEATURES = ("layer", "codes")
PROJECTORS = ("linear", "mlp2x_gelu")
IGNORE = -100  # label of positions without a loss (prompt, image, padding)
IMAGE_SLOT = -1  # where a rendered id list holds the image


@dataclass
class TowerConfig:
    """What the vision tower gives.

    Attributes:
        feature: "layer" (the continuous output of encoder block ``layer``, before the quantizer) or "codes" (the
            BSQ codes of the tokens, (N, d) in {+-1/sqrt(d)}: the post-quantizer ablation).
        layer: the block for "layer": -2 second to last (LLaVA's and the paper's choice), -1 the last.
        include_cls: put the CLS token before the patch tokens ("layer" only).
        tokens: image positions the tower gives (N, + 1 with CLS); filled from the QLIP model.
        width: feature width C (the encoder width, or the code bits); filled from the QLIP model.
    """

    feature: str = "layer"
    layer: int = -2
    include_cls: bool = False
    tokens: int = 0
    width: int = 0

    def __post_init__(self) -> None:
        if self.feature not in FEATURES:
            raise UnderstandingError(f"vision feature {self.feature!r} is not one of {list(FEATURES)}")
        if self.feature == "codes" and self.include_cls:
            raise UnderstandingError("the quantized codes have no CLS token: set include_cls to false")


LM_WEIGHTS = ("source", "full", "lora")  # where an "hf" language model's weights come from


@dataclass
class LMConfig:
    """Which language model fills the slot: ``kind`` "qlip-ar" (``ar``: an ARConfig dict, weights saved with the
    VLM) or "hf" (``source``: where the pretrained model is read from, e.g. a GGUF file).

    ``weights`` says what an "hf" VLM directory adds to its source: "source" nothing (the LM was frozen), "full"
    every LM weight (instruction tuning of the whole LM: loaded over the source's), "lora" low-rank adapters
    (``lora``: their rank, alpha, dropout and targets, see :func:`qlip.nn.lora.add_lora`) applied to the source."""

    kind: str = "qlip-ar"
    ar: dict[str, Any] | None = None
    source: str = ""
    weights: str = "source"
    lora: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.weights not in LM_WEIGHTS:
            raise UnderstandingError(f"language model weights {self.weights!r} is not one of {list(LM_WEIGHTS)}")
        if self.weights != "source" and self.kind != "hf":
            raise UnderstandingError(f"language model weights {self.weights!r} are for an 'hf' LM, not {self.kind!r}")
        if (self.weights == "lora") != (self.lora is not None):
            raise UnderstandingError("an LM with weights 'lora' needs its lora options (rank, alpha, targets), and "
                                     "only such an LM has them")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.weights == "source":  # a frozen LM's entry reads as before weights existed
            del d["weights"], d["lora"]
        return d


@dataclass
class VLMConfig:
    """Tower, projector and language model. ``merge`` > 1 concatenates each ``merge`` x ``merge`` block of
    neighbouring patch features before the projector (merge**2 times fewer image positions, none of their content
    dropped; 1 = LLaVA's one position per patch). ``feature_norm`` layer-normalizes each position's features (no
    parameters) before that, so features of any scale (block outputs, +-1/sqrt(d) codes) reach the projector alike."""

    tower: TowerConfig = field(default_factory=TowerConfig)
    projector: str = "mlp2x_gelu"
    lm: LMConfig = field(default_factory=LMConfig)
    merge: int = 1
    feature_norm: bool = False

    def __post_init__(self) -> None:
        if self.projector not in PROJECTORS:
            raise UnderstandingError(f"projector {self.projector!r} is not one of {list(PROJECTORS)}")
        if self.merge < 1:
            raise UnderstandingError(f"merge must be >= 1, got {self.merge}")
        if self.merge > 1 and self.tower.include_cls:
            raise UnderstandingError("merging patch features needs the patch grid alone: set include_cls to false")
        if self.tower.tokens:
            grid = math.isqrt(self.tower.tokens - int(self.tower.include_cls))
            if grid % self.merge:
                raise UnderstandingError(f"merge {self.merge} does not divide the tower's {grid} x {grid} patch grid")

    @property
    def image_tokens(self) -> int:
        """Image positions in the language model's sequence."""
        return self.tower.tokens // self.merge**2

    @property
    def projector_in(self) -> int:
        return self.tower.width * self.merge**2

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "lm": self.lm.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLMConfig:
        return cls(tower=TowerConfig(**d["tower"]), projector=d["projector"], lm=LMConfig(**d["lm"]),
                   merge=int(d.get("merge", 1)), feature_norm=bool(d.get("feature_norm", False)))


# --- the parts ---------------------------------------------------------------------------------------------------
class VisionTower(nn.Module):
    """A frozen QLIP encoder giving (B, N, C) features of the kind ``cfg`` names."""

    def __init__(self, qlip_model: nn.Module, cfg: TowerConfig):
        super().__init__()
        if qlip_model.visual is None:
            raise UnderstandingError("the QLIP model has no image encoder; the vision tower needs one")
        if cfg.feature == "codes" and qlip_model.quantizer is None:
            raise UnderstandingError("feature 'codes' needs the QLIP model's quantizer; load it with that part")
        depth = qlip_model.cfg.vision.layers
        if cfg.feature == "layer" and not -depth <= cfg.layer < depth:
            raise UnderstandingError(f"vision layer {cfg.layer} does not exist: the encoder has {depth} blocks "
                                     f"(use -{depth}..{depth - 1}; -2 is the second to last)")  # fmt: skip
        self.qlip = qlip_model.requires_grad_(False).eval()
        grid = qlip_model.grid_size
        width = qlip_model.cfg.vision.width if cfg.feature == "layer" else qlip_model.num_bits
        self.cfg = dataclasses.replace(cfg, tokens=grid * grid + int(cfg.include_cls), width=width)

    @property
    def image_size(self) -> int:
        return self.qlip.image_size

    def train(self, mode: bool = True) -> VisionTower:
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """CLIP-normalized images (B, 3, S, S) -> features (B, N, C)."""
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (3, s, s):
            raise UnderstandingError(f"the vision tower reads images of shape (B, 3, {s}, {s}), got "
                                     f"{tuple(images.shape)}")  # fmt: skip
        if self.cfg.feature == "codes":
            codes = self.qlip.encode(images, output="codes")  # (B, h, w, d)
            return codes.flatten(1, 2).float()
        return self.qlip.encode_image_features(images, layer=self.cfg.layer, include_cls=self.cfg.include_cls)


def make_projector(kind: str, in_width: int, out_width: int) -> nn.Module:
    """LLaVA's projectors: "linear", or "mlp2x_gelu" (Linear, GELU, Linear) of LLaVA-1.5."""
    if kind == "linear":
        return nn.Linear(in_width, out_width)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_width, out_width), nn.GELU(), nn.Linear(out_width, out_width))
    raise UnderstandingError(f"projector {kind!r} is not one of {list(PROJECTORS)}")


# --- conversations -> ids ------------------------------------------------------------------------------------------
def render_conversation(tokenizer: Any, turns: list[tuple[str, str | None]]) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation; the image's place is one :data:`IMAGE_SLOT` id.

    ``turns``: (user text, answer) pairs; the last answer may be None (a prompt to answer). The ``<image>``
    placeholder must appear exactly once, in the first user text (put in front of it when absent there). Labels
    are :data:`IGNORE` on the prompt and the image and the ids of the answers and their eos.
    """
    if not turns:
        raise UnderstandingError("a conversation needs at least one user turn")
    count = sum(user.count(IMAGE_TOKEN) for user, _ in turns)
    if count == 0:
        turns = [(f"{IMAGE_TOKEN}\n{turns[0][0]}", turns[0][1]), *turns[1:]]
    elif count > 1 or IMAGE_TOKEN not in turns[0][0]:
        raise UnderstandingError(f"the conversation must hold one {IMAGE_TOKEN} placeholder, in its first user turn "
                                 f"(it holds {count})")  # fmt: skip
    ids: list[int] = []
    labels: list[int] = []
    for i, (user, answer) in enumerate(turns):
        prompt = tokenizer.chat_prompt(user)
        if i == 0:
            before, after = prompt.split(IMAGE_TOKEN)
            part = tokenizer.encode(before) + [IMAGE_SLOT] + tokenizer.encode(after)
        else:
            part = tokenizer.encode(prompt)
        ids += part
        labels += [IGNORE] * len(part)
        if answer is None:
            if i != len(turns) - 1:
                raise UnderstandingError(f"turn {i} has no answer but is not the last turn")
            break
        reply = tokenizer.encode(answer) + [tokenizer.eos_id]
        ids += reply
        labels += reply
    return ids, labels


def collate_conversations(rendered: list[tuple[list[int], list[int]]], image_tokens: int, pad_id: int, *,
                          left_pad: bool = False) -> dict[str, Tensor]:  # fmt: skip
    """Rendered conversations -> padded tensors, the image slot expanded to ``image_tokens`` positions.

    Returns ``ids`` (B, T) (pad_id at image and pad positions), ``labels`` (B, T), ``mask`` (B, T) bool (False:
    padding) and ``image`` (B, T) bool (the image positions, ``image_tokens`` per row, in order).
    """
    rows = []
    for ids, labels in rendered:
        if ids.count(IMAGE_SLOT) != 1:
            raise UnderstandingError("each conversation must hold exactly one image")
        k = ids.index(IMAGE_SLOT)
        full_ids = ids[:k] + [pad_id] * image_tokens + ids[k + 1 :]
        full_labels = labels[:k] + [IGNORE] * image_tokens + labels[k + 1 :]
        image = [False] * k + [True] * image_tokens + [False] * (len(ids) - k - 1)
        rows.append((full_ids, full_labels, image))
    t = max(len(r[0]) for r in rows)
    out = {"ids": torch.full((len(rows), t), pad_id, dtype=torch.long),
           "labels": torch.full((len(rows), t), IGNORE, dtype=torch.long),
           "mask": torch.zeros(len(rows), t, dtype=torch.bool), "image": torch.zeros(len(rows), t, dtype=torch.bool)}
    for b, (ids, labels, image) in enumerate(rows):
        n = len(ids)
        sl = slice(t - n, t) if left_pad else slice(0, n)
        out["ids"][b, sl] = torch.tensor(ids)
        out["labels"][b, sl] = torch.tensor(labels)
        out["mask"][b, sl] = True
        out["image"][b, sl] = torch.tensor(image)
    return out


# --- the model ---------------------------------------------------------------------------------------------------
class VisionLanguageModel(nn.Module):
    """Vision tower (frozen) + projector + language model, with the tokenizer and the chat API.

    ``tower`` may be None for a model that only ever receives precomputed features (training with a feature
    cache); ``chat`` and ``answer`` need it.
    """

    def __init__(self, cfg: VLMConfig, tower: VisionTower | None, lm: nn.Module, tokenizer: Any):
        super().__init__()
        if tower is not None:
            mine, theirs = cfg.tower, tower.cfg
            if (theirs.feature, theirs.layer, theirs.include_cls) != (mine.feature, mine.layer, mine.include_cls):
                raise UnderstandingError(f"the vision tower gives {theirs.feature} (layer {theirs.layer}, cls "
                                         f"{theirs.include_cls}) but the model was made for {mine.feature} (layer "
                                         f"{mine.layer}, cls {mine.include_cls})")  # fmt: skip
            if mine.tokens and (theirs.tokens, theirs.width) != (mine.tokens, mine.width):
                raise UnderstandingError(
                    f"the vision tower gives {theirs.tokens} tokens of width {theirs.width} but the projector was "
                    f"made for {mine.tokens} of width {mine.width}; use the QLIP model the VLM was trained with")
            cfg = dataclasses.replace(cfg, tower=theirs)  # checks the merge against the tower's grid
        if cfg.tower.tokens < 1 or cfg.tower.width < 1:
            raise UnderstandingError("the VLM config does not say how many image tokens of what width it reads")
        if tokenizer.vocab_size > lm.vocab_size:
            raise UnderstandingError(f"the tokenizer has {tokenizer.vocab_size} ids but the language model only "
                                     f"{lm.vocab_size}")  # fmt: skip
        self.cfg = cfg
        self.tower = tower
        self.projector = make_projector(cfg.projector, cfg.projector_in, lm.width)
        self.lm = lm
        self.tokenizer = tokenizer

    @property
    def image_tokens(self) -> int:
        """Image positions in the language model's sequence."""
        return self.cfg.image_tokens

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    # --- pieces --------------------------------------------------------------------------------------------------
    def image_features(self, images: Tensor) -> Tensor:
        if self.tower is None:
            raise UnderstandingError("this VLM was built without its vision tower; give image features instead")
        return self.tower(images)

    def project(self, features: Tensor) -> Tensor:
        """Tower features (B, N, C) -> LM embeddings (B, N, W)."""
        n, c = self.cfg.tower.tokens, self.cfg.tower.width
        if features.ndim != 3 or features.shape[1:] != (n, c):
            raise UnderstandingError(f"image features must have shape (B, {n}, {c}) for this projector, got "
                                     f"{tuple(features.shape)}")  # fmt: skip
        if self.cfg.feature_norm:
            features = F.layer_norm(features.float(), (c,))
        if self.cfg.merge > 1:
            m = self.cfg.merge
            g = math.isqrt(n)
            features = rearrange(features, "b (h p w q) c -> b (h w) (p q c)", h=g // m, p=m, w=g // m, q=m)
        return self.projector(features.to(next(self.projector.parameters()).dtype))  # (B, N / merge**2, W)

    def embed_inputs(self, batch: dict[str, Tensor], features: Tensor) -> Tensor:
        """Token embeddings with the projected image features at the image positions -> (B, T, W)."""
        x = self.lm.embed(batch["ids"])  # (B, T, W)
        img = self.project(features).to(x.dtype)  # (B, N, W)
        return x.masked_scatter(batch["image"][..., None], img)

    def forward(self, batch: dict[str, Tensor], features: Tensor | None = None, *,
                images: Tensor | None = None) -> dict[str, Tensor]:  # fmt: skip
        """Teacher-forced loss on the answer tokens. ``batch`` from :func:`collate_conversations` (right padded);
        ``features`` (B, N, C) of the tower, or ``images`` (B, 3, S, S) that the frozen tower reads here, without
        a gradient (inside the forward, so that a sharded model gathers the tower's weights for it).
        Returns {"loss", "answer_tokens", "accuracy"} (token accuracy)."""
        if (features is None) == (images is None):
            raise UnderstandingError("the VLM's forward takes exactly one of the tower's features and the images")
        if features is None:
            features = self.image_features(images)
        x = self.embed_inputs(batch, features)
        mask = batch["mask"]
        hidden = self.lm.forward_embeds(x, key_padding_mask=None if bool(mask.all()) else mask)
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE  # (B, T-1)
        logits = self.lm.head(hidden[:, :-1][keep])  # (K, V): the head only where an answer token is predicted
        loss = F.cross_entropy(logits.float(), targets[keep])
        accuracy = (logits.argmax(-1) == targets[keep]).float().mean().detach()
        return {"loss": loss, "answer_tokens": keep.sum().detach(), "accuracy": accuracy}

    # --- generation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(self, features: Tensor, prompts: list[list[tuple[str, str | None]]], *,
                     max_new_tokens: int = 32, chooser: Chooser | None = None,
                     use_cache: bool = True) -> list[list[int]]:  # fmt: skip
        """Answer ids (eos and what follows dropped) for each conversation (its last answer None), batched with a
        left-padded prompt and the language model's cache; ``chooser`` None is greedy."""
        chooser = chooser or Chooser(guided=False, temperature=0.0)
        rendered = [render_conversation(self.tokenizer, turns) for turns in prompts]
        batch = collate_conversations(rendered, self.image_tokens, self.tokenizer.pad_id, left_pad=True)
        batch = {k: v.to(features.device) for k, v in batch.items()}
        b, t = batch["ids"].shape
        limit = int(self.lm.max_seq_len)
        if t + 1 > limit:
            raise UnderstandingError(f"the prompt takes {t} positions ({self.image_tokens} of them the image) but the "
                                     f"language model's context is {limit}; shorten the question")  # fmt: skip
        steps = min(int(max_new_tokens), limit - t)
        if steps < 1:
            raise UnderstandingError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        was_training = self.training
        self.eval()
        try:
            x = self.embed_inputs(batch, features)
            mask = batch["mask"]
            cache = self.lm.new_cache(b, max_len=t + steps) if use_cache else None
            hidden = self.lm.forward_embeds(x, cache=cache, key_padding_mask=mask)[:, -1:]
            out, done = [], torch.zeros(b, dtype=torch.bool, device=x.device)
            for step in range(steps):
                ids = chooser(self.lm.head(hidden)[:, -1])  # (B,)
                ids = torch.where(done, torch.full_like(ids, self.tokenizer.eos_id), ids)
                out.append(ids)
                done |= ids == self.tokenizer.eos_id
                if bool(done.all()) or step == steps - 1:
                    break
                step_x = self.lm.embed(ids[:, None]).to(x.dtype)
                if cache is not None:
                    hidden = self.lm.forward_embeds(step_x, cache=cache)
                else:
                    x = torch.cat([x, step_x], dim=1)
                    mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=mask.device)], dim=1)
                    hidden = self.lm.forward_embeds(x, key_padding_mask=mask)[:, -1:]
        finally:
            self.train(was_training)
        rows = torch.stack(out, dim=1).tolist()
        eos = self.tokenizer.eos_id
        return [r[: r.index(eos)] if eos in r else r for r in rows]

    @torch.no_grad()
    def answer(self, images: Any, questions: list[str], *, max_new_tokens: int = 32, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, blind: bool = False) -> list[str]:  # fmt: skip
        """One answer per (image, question): images are PIL images, paths or a (B, 3, S, S) normalized tensor.
        ``blind`` replaces the image features by zeros (the language prior alone). Greedy unless a temperature
        is given (then nucleus sampling with ``top_p``, seeded)."""
        pixels = self.preprocess(images)
        if pixels.shape[0] != len(questions):
            raise UnderstandingError(f"{pixels.shape[0]} image(s) for {len(questions)} question(s); give one each")
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise UnderstandingError(f"question {i} is empty; ask something about the image")
        features = self.image_features(pixels.to(self.device))
        if blind:
            features = torch.zeros_like(features)
        try:
            g = torch.Generator(device=self.device).manual_seed(int(seed)) if temperature else None
            chooser = Chooser(guided=False, temperature=temperature, top_p=top_p, generator=g)
        except ValueError as e:
            raise UnderstandingError(str(e)) from None
        ids = self.generate_ids(features, [[(q, None)] for q in questions], max_new_tokens=max_new_tokens,
                                chooser=chooser)  # fmt: skip
        return [self.tokenizer.decode(r).strip() for r in ids]

    def chat(self, image: Any, question: str, **options: Any) -> str:
        """The answer to one question about one image (PIL image or path); options as :meth:`answer`."""
        return self.answer([image], [question], **options)[0]

    def preprocess(self, images: Any) -> Tensor:
        """PIL images / paths / a tensor -> CLIP-normalized (B, 3, S, S) at the tower's resolution."""
        from PIL import Image

        from ..transforms import ImageLoadError, image_transform, load_image

        if isinstance(images, Tensor):
            return images if images.ndim == 4 else images[None]
        if images is None or isinstance(images, (str, Image.Image)) or hasattr(images, "__fspath__"):
            images = [images]
        if self.tower is None:
            raise UnderstandingError("this VLM was built without its vision tower; it cannot read images")
        transform = image_transform(self.tower.image_size)
        out = []
        for img in images:
            if img is None:
                raise UnderstandingError("no image given; the model answers questions about an image")
            if not isinstance(img, Image.Image):
                try:
                    img = load_image(img)
                except (ImageLoadError, OSError) as e:
                    raise UnderstandingError(f"cannot read the image {img}: {e}") from None
            out.append(transform(img))
        if not out:
            raise UnderstandingError("no image given; the model answers questions about an image")
        return torch.stack(out)
