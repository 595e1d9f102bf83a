"""One autoregressive decoder over one vocabulary: text tokens, image markers and visual sub-tokens (UM3).

The unified model of the paper is a text language model (the package's :class:`qlip.ar.ARTransformer`, with
QK-norm) whose vocabulary is extended with the visual tokens. Ids, in order::

    [0, V_text)                     the text tokenizer's ids (its start / end tokens included)
    V_text, V_text + 1              begin-of-image, end-of-image (never predicted: the format places them)
    V_text + 2 + p * 2^k + c        visual sub-token c of part p: a d-bit image token split into ``parts`` codes
                                    of k = d / parts bits, most significant first (the subtoken codec's split)

A plain language model (:func:`text_config`) has the text ids only; :func:`extend_vocabulary` adds the others,
their embedding and output rows set to the mean of the text rows, so the text outputs do not move.

**Bit features** (``visual_bits``, optional): a visual id's input embedding and output row each get an added
linear map of its sub-code's k bits as +-1 (one map per part, starting at zero): ``row(id) + sum_b s_b(id) u_b``.
A BSQ token's bits are the coordinates of its quantized latent, so codes that share bits share most of their
representation from the first step, where free rows must each be learnt from the steps that show them.

**Slot positions** (``visual_positions``, optional): a visual id's input embedding gets a learnt vector of its
slot in the image (raster cell and part, ``grid * grid * parts`` of them, starting at zero). RoPE gives attention
the offsets between tokens only; a shape is a pattern of bits at places of the grid, which a readout finds far more
easily when each token says where it is.

**Split softmax.** A target is normalized over its own modality only: a text target over the text ids, a visual
target over the visual ids (:func:`split_nll`); sampling restricts each step to the ids its modality allows (a
softmax over the allowed ids of the full logits is exactly the modality's softmax).

Sequences (``sot``/``eot``: the text tokenizer's start / end tokens; the loss covers the targets in brackets)::

    text        sot [t1 .. tn eot]                        a window of the corpus stream
    image->text boi v1 .. vT eoi sot [c1 .. cm eot]      caption of an image
    text->image sot c1 .. cm eot boi [v1 .. vT] eoi      image of a caption (the caption may be dropped: CFG)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ar.decode import decode
from ..ar.model import ARConfig, ARTransformer, KVCache
from ..ar.sampling import Chooser
from ..config import dataclass_from_dict
from ..generation.codec import check_split, join_tokens, split_tokens
from ..quantizers.bsq import bits_to_codes, indices_to_bits

LM_FORMAT = "qlip-lm"
UNIFIED_FORMAT = "qlip-um3"
KINDS = ("text", "image_to_text", "text_to_image")


@dataclass
class ImageVocab:
    """The image tokens a unified model reads and writes: the QLIP tokenizer's grid and bits, and the split.

    Attributes:
        model: the QLIP tokenizer's name; fingerprint: its quantizer's fingerprint (None: unknown).
        grid: tokens per side; bits: bits per token; parts: sub-tokens per token (``bits`` divisible by it).
    """

    model: str
    grid: int
    bits: int
    parts: int = 2
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        check_split(self.bits, self.parts)

    @property
    def part_vocab(self) -> int:
        return 1 << (self.bits // self.parts)

    @property
    def size(self) -> int:
        """Visual ids: ``parts`` blocks of ``part_vocab``."""
        return self.parts * self.part_vocab

    @property
    def steps(self) -> int:
        """Visual sub-tokens of one image."""
        return self.grid * self.grid * self.parts


@dataclass
class UnifiedConfig:
    """A language model (``image`` None) or a unified model; see the module docstring for the id layout.

    Attributes:
        ar: the decoder (its ``vocab_size`` is :attr:`vocab_size`).
        text_vocab, sot_id, eot_id: the text tokenizer's size and its start / end ids.
        image: the image vocabulary (None for a text-only language model).
        visual_bits: add the bit features to the visual ids' embeddings and output rows (module docstring).
        visual_positions: add a learnt embedding of each visual id's slot in its image (module docstring).
        corpus: what the text corpus was (:meth:`qlip.unified.corpus.TextCorpus.describe`).
        reference: figures of the language model a unified model started from (its held-out perplexity).
    """

    ar: ARConfig
    text_vocab: int
    sot_id: int
    eot_id: int
    image: ImageVocab | None = None
    corpus: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    visual_bits: bool = False
    visual_positions: bool = False

    def __post_init__(self) -> None:
        if (self.visual_bits or self.visual_positions) and self.image is None:
            raise ValueError("visual_bits and visual_positions need an image vocabulary")
        if self.ar.vocab_size != self.vocab_size:
            raise ValueError(f"the decoder has {self.ar.vocab_size} ids but the vocabulary has {self.vocab_size}")

    @property
    def format(self) -> str:
        return LM_FORMAT if self.image is None else UNIFIED_FORMAT

    @property
    def boi_id(self) -> int:
        return self.text_vocab

    @property
    def eoi_id(self) -> int:
        return self.text_vocab + 1

    @property
    def visual_start(self) -> int:
        return self.text_vocab + 2

    @property
    def vocab_size(self) -> int:
        return self.text_vocab if self.image is None else self.visual_start + self.image.size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {"format": self.format, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnifiedConfig:
        d = dict(d)
        d.pop("format", None)
        ar = ARConfig.from_dict(d.pop("ar"))
        image = d.pop("image", None)
        image = dataclass_from_dict(ImageVocab, image, where="image") if image is not None else None
        return cls(ar=ar, image=image, **d)


def text_config(text_vocab: int, sot_id: int, eot_id: int, *, width: int, depth: int, heads: int, max_seq_len: int,
                qk_norm: bool = True, corpus: dict[str, Any] | None = None) -> UnifiedConfig:  # fmt: skip
    """The config of a text-only language model over ``text_vocab`` ids."""
    ar = ARConfig(vocab_size=text_vocab, width=width, depth=depth, heads=heads, max_seq_len=max_seq_len,
                  qk_norm=qk_norm)  # fmt: skip
    return UnifiedConfig(ar=ar, text_vocab=text_vocab, sot_id=sot_id, eot_id=eot_id, corpus=dict(corpus or {}))


def split_nll(logits: Tensor, targets: Tensor, text_vocab: int, visual_start: int | None) -> Tensor:
    """Per-target negative log-likelihood (B, T) under the split softmax: a target below ``text_vocab`` is
    normalized over the text ids, one at or above ``visual_start`` over the visual ids (markers: neither; callers
    mask them out). ``visual_start`` None: a text-only vocabulary."""
    logits = logits.float()
    picked = logits.gather(-1, targets[..., None])[..., 0]  # (B, T)
    norm = logits[..., :text_vocab].logsumexp(-1)
    if visual_start is not None:
        norm = torch.where(targets >= visual_start, logits[..., visual_start:].logsumexp(-1), norm)
    return norm - picked


LOSS_WEIGHTINGS = ("tokens", "rows")


def reduce_nll(nll: Tensor, mask: Tensor, weighting: str = "tokens") -> Tensor:
    """The batch loss from per-target NLL (B, T) and its mask (B, T) bool: "tokens" averages over every target of
    the batch (a long row weighs more); "rows" averages each row over its own targets, then over the rows that have
    any (every row weighs the same)."""
    if weighting == "tokens":
        return (nll * mask).sum() / mask.sum().clamp(min=1)
    if weighting == "rows":
        counts = mask.sum(1)
        return ((nll * mask).sum(1) / counts.clamp(min=1)).sum() / (counts > 0).sum().clamp(min=1)
    raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")


class UnifiedCache(KVCache):
    """The decoder's KV cache plus, per row, how many visual ids it holds (the slot of the next one)."""

    def __init__(self, layers: int, batch: int, *args: Any, **kwargs: Any):
        super().__init__(layers, batch, *args, **kwargs)
        self.visual_seen = torch.zeros(batch, dtype=torch.long, device=self.valid.device)

    def reset(self) -> None:
        super().reset()
        self.visual_seen.zero_()


class UnifiedLM(nn.Module):
    """The decoder of a language model or a unified model (see the module docstring)."""

    def __init__(self, cfg: UnifiedConfig):
        super().__init__()
        self.cfg = cfg
        self.core = ARTransformer(cfg.ar)
        if cfg.visual_bits:
            image = cfg.image
            k = image.bits // image.parts
            self.bits_in = nn.Parameter(torch.zeros(image.parts, k, cfg.ar.width))
            self.bits_out = nn.Parameter(torch.zeros(image.parts, k, cfg.ar.width))
            codes = torch.arange(image.part_vocab)
            signs = bits_to_codes(indices_to_bits(codes, k), scale=False)  # (2^k, k) as +-1, most significant first
            self.register_buffer("bit_signs", signs, persistent=False)
        if cfg.visual_positions:
            self.slot_embed = nn.Parameter(torch.zeros(cfg.image.steps, cfg.ar.width))

    @property
    def device(self) -> torch.device:
        return self.core.norm.weight.device

    def _with_bits(self, table: Tensor, maps: Tensor) -> Tensor:
        """A (V, W) table with each visual row's bit features added (the text and marker rows as they are)."""
        c = self.cfg
        delta = torch.einsum("ck,pkw->pcw", self.bit_signs.to(maps.dtype), maps).flatten(0, 1)  # (parts*2^k, W)
        return torch.cat([table[: c.visual_start], table[c.visual_start :] + delta.to(table.dtype)])

    def input_table(self) -> Tensor:
        """The (V, W) input embedding table (with the bit features, if the model has them)."""
        table = self.core.tok_embed.weight
        return self._with_bits(table, self.bits_in) if self.cfg.visual_bits else table

    def output_table(self) -> Tensor:
        """The (V, W) output rows (with the bit features, if the model has them)."""
        core = self.core
        table = core.lm_head.weight if core.lm_head is not None else core.tok_embed.weight
        return self._with_bits(table, self.bits_out) if self.cfg.visual_bits else table

    def embed(self, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
        """Ids (B, T) -> input embeddings (B, T, W). With slot positions, a visual id's slot is the number of visual
        ids before it in its row: in ``tokens`` and, with a cache (:meth:`new_cache`), in what the cache holds."""
        c = self.cfg
        x = F.embedding(tokens, self.input_table())
        if not c.visual_positions:
            return x
        visual = tokens >= c.visual_start
        seen = visual.long().cumsum(1)
        if cache is not None:
            if not isinstance(cache, UnifiedCache):
                raise TypeError("slot positions need the cache of UnifiedLM.new_cache (it counts the visual ids)")
            seen = seen + cache.visual_seen[:, None]
            cache.visual_seen = seen[:, -1]
        slot = (seen - 1).clamp(0, c.image.steps - 1)
        return x + self.slot_embed[slot].to(x.dtype) * visual[..., None]

    def new_cache(self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for :meth:`forward`: the decoder's, counting the visual ids it has seen per row."""
        return self.core.new_cache(batch, max_len, dtype=dtype, cache_class=UnifiedCache)

    def forward(self, tokens: Tensor, targets: Tensor | None = None, loss_mask: Tensor | None = None, *,
                cache: KVCache | None = None, key_padding_mask: Tensor | None = None) -> Tensor:  # fmt: skip
        """Ids (B, T) -> logits (B, T, V), causal (``cache`` / ``key_padding_mask``: as
        :meth:`qlip.ar.ARTransformer.forward_embeds`). With ``targets`` (B, T) and ``loss_mask`` (B, T) bool: the
        split-softmax NLL (B, T) of the targets instead (0 where the mask is False), the values of
        :func:`split_nll` but with the output head applied only at the masked-in positions and only over the
        vocabulary each target is normalized in (training's path: no (B, T, V) logits)."""
        if targets is None:
            x = self.embed(tokens, cache)
            hidden = self.core.forward_embeds(x, cache=cache, key_padding_mask=key_padding_mask)
            return hidden @ self.output_table().t()
        if loss_mask is None:
            raise ValueError("targets need a loss_mask")
        hidden = self.core.forward_embeds(self.embed(tokens), key_padding_mask=key_padding_mask)
        weight = self.output_table()
        c = self.cfg
        visual = targets >= c.visual_start if c.image is not None else torch.zeros_like(loss_mask)
        nll = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
        # text targets (and markers, which callers mask out) read the rows below the visual ids and are normalized
        # over the text ids; visual targets read and are normalized over the visual rows. The picked logit comes
        # from the same product as the normalizer, so both share one precision (under autocast too).
        below_visual = c.visual_start if c.image is not None else c.text_vocab
        for sel, lo, hi, norm_cols in ((loss_mask & ~visual, 0, below_visual, c.text_vocab),
                                       (loss_mask & visual, c.visual_start, None, None)):  # fmt: skip
            if not bool(sel.any()):
                continue
            logits = (hidden[sel] @ weight[lo:hi].t()).float()  # (n, hi - lo)
            picked = logits.gather(-1, (targets[sel] - lo)[:, None])[:, 0]
            nll = nll.index_put(sel.nonzero(as_tuple=True), logits[:, :norm_cols].logsumexp(-1) - picked)
        return nll

    def nll(self, tokens: Tensor, loss_mask: Tensor) -> Tensor:
        """Split-softmax NLL (B, T-1) of ``tokens[:, 1:]`` (0 where ``loss_mask`` (B, T-1) is False)."""
        return self(tokens[:, :-1], tokens[:, 1:], loss_mask)

    # --- image tokens <-> visual ids -----------------------------------------------------------------------------
    def image_vocab(self) -> ImageVocab:
        if self.cfg.image is None:
            raise ValueError("this is a text-only language model: it has no image vocabulary (train a unified "
                             "model, task: unified, to read or write images)")  # fmt: skip
        return self.cfg.image

    def to_visual_ids(self, tokens: Tensor) -> Tensor:
        """Image tokens (B, h, w) -> visual ids (B, h * w * parts), raster order, most significant part first."""
        image = self.image_vocab()
        sub = split_tokens(tokens.flatten(1).long(), image.bits, image.parts)  # (B, N, parts)
        offsets = torch.arange(image.parts, device=tokens.device) * image.part_vocab + self.cfg.visual_start
        return (sub + offsets).flatten(1)

    def from_visual_ids(self, ids: Tensor) -> Tensor:
        """Inverse of :meth:`to_visual_ids`: (B, N * parts) -> (B, grid, grid)."""
        image = self.image_vocab()
        sub = ids.unflatten(1, (-1, image.parts)) - self.cfg.visual_start
        sub = sub - torch.arange(image.parts, device=ids.device) * image.part_vocab
        return join_tokens(sub, image.bits, image.parts).view(-1, image.grid, image.grid)

    # --- sampling -----------------------------------------------------------------------------------------------
    # The ids a step may not use get the dtype's lowest finite value rather than -inf: guidance subtracts the
    # unconditional logits, and -inf - -inf would be NaN; exp() of it is still exactly 0 after the softmax.
    def _text_only(self, logits: Tensor, step: int) -> Tensor:
        logits = logits.clone()
        logits[:, self.cfg.text_vocab :] = torch.finfo(logits.dtype).min
        return logits

    def _visual_part(self, logits: Tensor, step: int) -> Tensor:
        image = self.cfg.image
        lo = self.cfg.visual_start + (step % image.parts) * image.part_vocab
        out = torch.full_like(logits, torch.finfo(logits.dtype).min)
        out[:, lo : lo + image.part_vocab] = logits[:, lo : lo + image.part_vocab]
        return out

    def _prompt(self, rows: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Left-padded ids and mask (B, T): with RoPE only the offsets between real tokens matter."""
        t = max(map(len, rows))
        ids = torch.zeros(len(rows), t, dtype=torch.long)
        mask = torch.zeros(len(rows), t, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, t - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, t - len(r) :] = True
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def sample_text(self, prompts: list[list[int]], max_new_tokens: int, chooser: Chooser) -> list[list[int]]:
        """Continue each id list with text ids until the end token (excluded) or ``max_new_tokens``."""
        ids, mask = self._prompt(prompts)
        max_new_tokens = min(max_new_tokens, self.cfg.ar.max_seq_len - ids.shape[1])
        if max_new_tokens < 1:
            raise ValueError(f"the prompt ({ids.shape[1]} tokens) fills the model's context of "
                             f"{self.cfg.ar.max_seq_len}; give a shorter prompt")  # fmt: skip
        out = decode(self, ids, max_new_tokens, chooser, prompt_mask=mask, logits_processor=self._text_only,
                     stop_id=self.cfg.eot_id)  # fmt: skip
        result = []
        for row in out.tolist():
            result.append(row[: row.index(self.cfg.eot_id)] if self.cfg.eot_id in row else row)
        return result

    def image_prompt(self, tokens: Tensor) -> list[list[int]]:
        """``boi v1 .. vT eoi sot`` for each image (B, h, w): the prompt of its caption."""
        cfg = self.cfg
        vis = self.to_visual_ids(tokens).tolist()
        return [[cfg.boi_id, *v, cfg.eoi_id, cfg.sot_id] for v in vis]

    def caption_prompt(self, caption: list[int]) -> list[int]:
        """``sot c1 .. cm eot boi``: the prompt of a caption's image (an empty caption: the unconditional one)."""
        return [self.cfg.sot_id, *caption, self.cfg.eot_id, self.cfg.boi_id]

    @torch.no_grad()
    def sample_image(self, captions: list[list[int]], chooser: Chooser) -> Tensor:
        """Image tokens (B, grid, grid) for caption ids; a guided chooser adds the unconditional rows (CFG)."""
        image = self.image_vocab()
        rows = [self.caption_prompt(c) for c in captions]
        if chooser.copies == 2:
            rows += [self.caption_prompt([])] * len(captions)
        ids, mask = self._prompt(rows)
        out = decode(self, ids, image.steps, chooser, prompt_mask=mask, logits_processor=self._visual_part)
        return self.from_visual_ids(out)


def training_row(model_cfg: UnifiedConfig, kind: str, text: list[int], visual: list[int] | None = None,
                 ) -> tuple[list[int], list[bool]]:  # fmt: skip
    """Ids and loss mask (over the targets ``ids[1:]``) of one training sequence (module docstring).

    ``text``: for "text" the whole window (its ``sot`` / ``eot`` included); otherwise the caption's ids alone.
    ``visual``: the image's visual ids (:meth:`UnifiedLM.to_visual_ids`).
    """
    c = model_cfg
    if kind == "text":
        return list(text), [True] * (len(text) - 1)
    if visual is None:
        raise ValueError(f"a {kind} row needs the image's visual ids")
    if kind == "image_to_text":
        head = [c.boi_id, *visual, c.eoi_id, c.sot_id]
        ids = head + [*text, c.eot_id]
        return ids, [False] * (len(head) - 1) + [True] * (len(text) + 1)
    if kind == "text_to_image":
        head = [c.sot_id, *text, c.eot_id, c.boi_id]
        ids = head + [*visual, c.eoi_id]
        return ids, [False] * (len(head) - 1) + [True] * len(visual) + [False]
    raise ValueError(f"unknown sequence kind {kind!r}; choose one of {KINDS}")


def extend_vocabulary(lm: UnifiedLM, image: ImageVocab, *, visual_bits: bool = False,
                      visual_positions: bool = False) -> UnifiedLM:  # fmt: skip
    """A unified model made from a text language model: the same decoder, with the markers and visual ids added;
    their input embeddings are the mean text embedding and their output rows the mean text output row
    (``visual_bits`` / ``visual_positions``: with the bit features / slot embeddings, starting at zero)."""
    if lm.cfg.image is not None:
        raise ValueError("the model already has an image vocabulary; extend a text-only language model")
    old = lm.cfg
    ar = dataclasses.replace(old.ar, vocab_size=old.text_vocab + 2 + image.size)
    cfg = dataclasses.replace(old, ar=ar, image=image, visual_bits=visual_bits, visual_positions=visual_positions)
    new = UnifiedLM(cfg).to(lm.device)
    state = lm.state_dict()
    grow = {}
    for key in ("core.tok_embed.weight", "core.lm_head.weight"):
        if key in state:
            w = state.pop(key)  # (V_text, W)
            rows = w.mean(0, keepdim=True).expand(cfg.vocab_size - old.text_vocab, -1)
            grow[key] = torch.cat([w, rows])
    zero = {k: v for k, v in new.state_dict().items() if k.startswith(("bits_", "slot_embed"))}  # start at zero
    new.load_state_dict({**state, **grow, **zero})
    return new
