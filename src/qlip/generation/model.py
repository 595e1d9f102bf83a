"""The text-to-image model: a caption prefix, then the image-token sequence of a codec, over the AR core.

Sequence layout (one row)::

    [caption prefix: L projected text states] [BOS] [codec steps 0 .. T-2]   -> hidden states at BOS .. T-2
                                                                                predict codec steps 0 .. T-1

The loss covers the image steps only. Captions are dropped to a learned null prefix with probability
``conditioning.dropout`` in training, which gives the unconditional branch of classifier-free guidance.

API::

    cfg = T2IConfig.for_tokenizer(TokenSpec.of(qlip_model), text=qlip_model.cfg.text, width=256, depth=4, heads=4)
    model = T2IModel(cfg, text_encoder=qlip_model.text)       # the text tower stays frozen and is not saved here
    out = model(tokens, text_ids)                             # tokens (B, h, w) int64, text_ids (B, L)
    out["loss"].backward()                                    # + per-part metrics (codec dependent)
    tokens = model.generate(text_ids, cfg_scale=3.0, temperature=1.0, top_k=0, top_p=1.0, seed=0)  # (B, h, w)
    model.save_pretrained(dir); T2IModel.from_pretrained(dir, text_encoder=qlip_model.text)

``model.trainable_parameters()`` lists what an optimizer should update (everything but the frozen text tower).

A training loop needs, per batch of token-file samples (image tokens + caption ids from the QLIP model's
tokenizer, padded to its text context): ``loss = model(tokens, text_ids)["loss"]`` (the other entries are scalar
metrics to log); before training, :func:`check_token_spec` against the token files' spec; to publish,
:func:`qlip.generation.save_generator` (the generator plus its QLIP model, one self-contained directory).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..ar.model import ARConfig, ARTransformer
from ..ar.sampling import Chooser
from ..fileio import check_model_target, replace_files
from ..tokenfile import TokenSpec
from ..weights import read_weight_file
from .codec import CodecConfig, make_codec
from .conditioning import CaptionPrefix, ConditioningConfig, FrozenTextEncoder
from .errors import GenerationInputError, GeneratorDirectoryError, TokenizerMismatchError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "qlip-t2i"
FORMAT_VERSION = 1
_FROZEN_PREFIX = "text_encoder."  # keys of the frozen text tower: never saved with the generator
_STAGE_PREFIX = ".qlip-t2i-save-"


@dataclass
class T2IConfig:
    """Everything a :class:`T2IModel` is built from. ``token_spec``: the tokenizer the image tokens come from
    (a :class:`qlip.tokenfile.TokenSpec` as a dict: model, grid, bits, group_size, image_size, quantizer)."""

    ar: ARConfig
    token_spec: dict[str, Any]
    codec: CodecConfig = field(default_factory=CodecConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)

    @property
    def spec(self) -> TokenSpec:
        return TokenSpec(**self.token_spec)

    @property
    def grid(self) -> int:
        return int(self.token_spec["grid"])

    @property
    def bits(self) -> int:
        return int(self.token_spec["bits"])

    def __post_init__(self) -> None:
        if self.ar.vocab_size != 0:
            raise ValueError("the generator's AR core takes embeddings from its codec: set ar.vocab_size to 0")
        need = self.sequence_length
        if self.ar.max_seq_len < need:
            raise ValueError(f"ar.max_seq_len {self.ar.max_seq_len} < the {need} positions the generator needs "
                             f"({self.conditioning.context_length} caption + 1 + image steps)")  # fmt: skip

    @property
    def image_steps(self) -> int:
        steps = make_codec_steps(self.codec)
        return self.grid * self.grid * steps

    @property
    def sequence_length(self) -> int:
        return self.conditioning.context_length + 1 + self.image_steps

    @classmethod
    def for_tokenizer(cls, spec: TokenSpec, *, text: Any, width: int = 256, depth: int = 4, heads: int = 4,
                      codec: CodecConfig | None = None, dropout: float = 0.1, encoder: str = "qlip",
                      **ar_options: Any) -> T2IConfig:  # fmt: skip
        """A config for tokens of ``spec``, conditioned on a text tower of config ``text`` (``width`` and
        ``context_length``: a QLIP TextConfig, or a Hugging Face encoder's ``cfg``) named by ``encoder``."""
        codec = codec or CodecConfig()
        cond = ConditioningConfig(encoder, context_length=text.context_length, width=text.width, dropout=dropout)
        max_len = cond.context_length + 1 + spec.grid * spec.grid * make_codec_steps(codec)
        ar = ARConfig(vocab_size=0, width=width, depth=depth, heads=heads, max_seq_len=max_len, **ar_options)
        return cls(ar=ar, token_spec=dataclasses.asdict(spec), codec=codec, conditioning=cond)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "ar": self.ar.to_dict(),
                "codec": self.codec.to_dict(), "conditioning": self.conditioning.to_dict(),
                "token_spec": dict(self.token_spec)}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> T2IConfig:
        if d.get("format") != FORMAT:
            raise GeneratorDirectoryError(f'not a generator config (expected "format": "{FORMAT}")')
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise GeneratorDirectoryError(f"generator format version {d['format_version']} is newer than this qlip "
                                          f"reads ({FORMAT_VERSION}); upgrade qlip")  # fmt: skip
        return cls(
            ar=ARConfig.from_dict(d["ar"]),
            token_spec=dict(d["token_spec"]),
            codec=CodecConfig.from_dict(d["codec"]),
            conditioning=ConditioningConfig.from_dict(d["conditioning"]),
        )


def make_codec_steps(codec: CodecConfig) -> int:
    """AR steps per image position of a codec config (without building it)."""
    return codec.parts if codec.kind == "subtoken" else 1


def check_token_spec(cfg: T2IConfig, spec: TokenSpec, what: str = "the QLIP model") -> None:
    """Raise :class:`TokenizerMismatchError` when ``spec`` (of a QLIP model or a token file) differs from the
    tokenizer the generator was made for in bits, grid or quantizer fingerprint."""
    mine = cfg.spec
    for name in ("bits", "grid"):
        if getattr(spec, name) != getattr(mine, name):
            raise TokenizerMismatchError(f"{what} has {name}={getattr(spec, name)} but the generator was made for "
                                         f"{name}={getattr(mine, name)} ({mine.model}); use the matching tokenizer")
    if spec.fingerprint is not None and mine.fingerprint is not None and spec.fingerprint != mine.fingerprint:
        raise TokenizerMismatchError(f"{what} has quantizer fingerprint {spec.fingerprint} but the generator was made "
                                     f"for {mine.fingerprint} ({mine.model}); use the matching tokenizer")  # fmt: skip


class T2IModel(nn.Module):
    """Caption prefix + AR core + image-token codec. See the module docstring."""

    def __init__(self, cfg: T2IConfig, text_encoder: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.text_encoder = FrozenTextEncoder(text_encoder)
        cond = cfg.conditioning
        if (self.text_encoder.width, self.text_encoder.context_length) != (cond.width, cond.context_length):
            made_with = "its QLIP model" if cond.encoder == "qlip" else f"{cond.encoder}, unchanged"
            raise TokenizerMismatchError(
                f"the text encoder has width {self.text_encoder.width} and context {self.text_encoder.context_length}"
                f" but the generator was made for {cond.width} and {cond.context_length}; use {made_with}")
        width = cfg.ar.width
        self.prefix = CaptionPrefix(cond.width, width, cond.context_length)
        self.bos = nn.Parameter(torch.randn(width) * 0.02)
        self.core = ARTransformer(cfg.ar)
        self.codec = make_codec(cfg.codec, cfg.bits, width)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith(_FROZEN_PREFIX)]

    def set_grad_checkpointing(self, enabled: bool = True) -> T2IModel:
        self.core.grad_checkpointing = enabled
        return self

    # --- inputs --------------------------------------------------------------------------------------------------
    def _check_text(self, text_ids: Tensor) -> None:
        length = self.cfg.conditioning.context_length
        if text_ids.ndim != 2 or text_ids.shape[1] != length:
            raise GenerationInputError(f"caption ids must have shape (B, {length}) (the text tower's context), got "
                                       f"{tuple(text_ids.shape)}; tokenize with the QLIP model's tokenizer")

    def _flat_tokens(self, tokens: Tensor) -> Tensor:
        g = self.cfg.grid
        if tokens.ndim != 3 or tokens.shape[1:] != (g, g):
            raise GenerationInputError(f"image tokens must have shape (B, {g}, {g}), got {tuple(tokens.shape)}")
        return tokens.flatten(1)  # (B, N), raster order

    def condition(self, text_ids: Tensor, drop: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Caption ids (B, L) -> (prefix (B, L, W), key mask (B, L)); ``drop`` (B,) bool picks null rows."""
        self._check_text(text_ids)
        states, mask = self.text_encoder(text_ids)
        return self.prefix(states, mask, drop)

    def _prefix_with_bos(self, prefix: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        bos = self.bos.to(prefix.dtype).expand(prefix.shape[0], 1, -1)
        ones = torch.ones(mask.shape[0], 1, dtype=torch.bool, device=mask.device)
        return torch.cat([prefix, bos], dim=1), torch.cat([mask, ones], dim=1)

    # --- training ------------------------------------------------------------------------------------------------
    def teacher_forced(self, tokens: Tensor, text_ids: Tensor,
                       drop: Tensor | None = None) -> tuple[Tensor, int, Tensor, Tensor]:  # fmt: skip
        """The decoder's final hidden states over (caption prefix, BOS, image steps but the last), teacher-forced:
        (hidden (B, P + T - 1, W), P = the prefix length with BOS, the codec sequence (B, T, ...), the drop mask).
        ``drop`` as in :meth:`forward`."""
        seq = self.codec.to_sequence(self._flat_tokens(tokens))  # (B, T, ...)
        if drop is None:
            p = self.cfg.conditioning.dropout if self.training else 0.0
            drop = torch.rand(seq.shape[0], device=seq.device) < p
        prefix, mask = self._prefix_with_bos(*self.condition(text_ids, drop))
        steps = self.codec.embed(seq[:, :-1])  # (B, T-1, W): the inputs after BOS
        x = torch.cat([prefix, steps.to(prefix.dtype)], dim=1)
        mask = torch.cat([mask, torch.ones(steps.shape[:2], dtype=torch.bool, device=mask.device)], dim=1)
        return self.core.forward_embeds(x, key_padding_mask=mask), prefix.shape[1], seq, drop

    def forward(self, tokens: Tensor, text_ids: Tensor, drop: Tensor | None = None) -> dict[str, Tensor]:
        """Teacher-forced loss on the image steps. tokens (B, h, w) int64; text_ids (B, L); ``drop`` (B,) bool
        overrides the random caption dropout (default: drawn with ``conditioning.dropout`` in training, none in
        eval). Returns {"loss", "drop_rate", per-part metrics of the codec}."""
        hidden, prefix_len, seq, drop = self.teacher_forced(tokens, text_ids, drop)
        loss, metrics = self.codec.loss(hidden[:, prefix_len - 1 :], seq)  # the states that predict the T steps
        return {"loss": loss, "drop_rate": drop.float().mean().detach(), **metrics}

    # --- sampling ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, text_ids: Tensor, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None, seed: int | None = None,
                 use_cache: bool = True) -> Tensor:  # fmt: skip
        """Sample image tokens (B, h, w) int64 for caption ids (B, L).

        ``cfg_scale`` 1 samples the conditional model alone; any other value doubles the batch with the null
        condition and mixes the logits (classifier-free guidance). ``generator`` (or a fresh one seeded with
        ``seed``) drives every random choice, so a seed reproduces the tokens. ``use_cache=False`` recomputes the
        whole sequence at each step (the reference the KV cache is tested against).
        """
        if seed is not None and generator is None:
            generator = torch.Generator(device=text_ids.device).manual_seed(int(seed))
        try:
            chooser = Chooser(guided=cfg_scale != 1.0, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                              top_p=top_p, generator=generator)  # fmt: skip
        except ValueError as e:
            raise GenerationInputError(str(e)) from None
        return self.sample_tokens(text_ids, chooser, use_cache=use_cache)

    @torch.no_grad()
    def sample_tokens(self, text_ids: Tensor, chooser: Chooser, use_cache: bool = True) -> Tensor:
        """The decoding loop of :meth:`generate` with an explicit :class:`qlip.ar.sampling.Chooser`."""
        was_training = self.training
        self.eval()
        try:
            return self._sample(text_ids, chooser, use_cache)
        finally:
            self.train(was_training)

    def _sample(self, text_ids: Tensor, chooser: Chooser, use_cache: bool) -> Tensor:
        b, copies, codec = text_ids.shape[0], chooser.copies, self.codec
        prefix, mask = self.condition(text_ids)
        if copies == 2:
            null, null_mask = self.prefix.null_prefix(b)
            prefix, mask = torch.cat([prefix, null.to(prefix.dtype)]), torch.cat([mask, null_mask])
        x0, mask0 = self._prefix_with_bos(prefix, mask)  # (copies*B, L+1, W)
        total = self.cfg.image_steps
        cache = self.core.new_cache(copies * b, max_len=x0.shape[1] + total) if use_cache else None
        hidden = self.core.forward_embeds(x0, cache=cache, key_padding_mask=mask0)[:, -1]  # (copies*B, W)
        values: list[Tensor] = []
        for step in range(total):
            value = codec.sample_step(hidden, step, chooser)  # (B, ...)
            values.append(value)
            if step == total - 1:
                break
            if cache is not None:
                fed = value.repeat(copies, *([1] * (value.ndim - 1)))[:, None]  # (copies*B, 1, ...)
                hidden = self.core.forward_embeds(codec.embed(fed, start=step).to(x0.dtype), cache=cache)[:, -1]
            else:
                seq = torch.stack(values, dim=1)
                seq = seq.repeat(copies, *([1] * (seq.ndim - 1)))  # (copies*B, t, ...)
                x = torch.cat([x0, codec.embed(seq).to(x0.dtype)], dim=1)
                pad = torch.ones(seq.shape[:2], dtype=torch.bool, device=mask0.device)
                hidden = self.core.forward_embeds(x, key_padding_mask=torch.cat([mask0, pad], dim=1))[:, -1]
        tokens = codec.from_sequence(torch.stack(values, dim=1))  # (B, N)
        return tokens.view(b, self.cfg.grid, self.cfg.grid)

    # --- saving --------------------------------------------------------------------------------------------------
    def state_dict_to_save(self) -> dict[str, Tensor]:
        """The trainable weights (the frozen text tower is left out: it belongs to the QLIP model)."""
        return {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()
                if not k.startswith(_FROZEN_PREFIX)}  # fmt: skip

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``config.json`` + ``model.safetensors`` atomically (config last). Other files of ``directory`` are
        kept; a non-empty folder that is not a generator directory is refused unless ``overwrite``."""
        directory = Path(directory)
        check_generator_target(directory, overwrite)
        with replace_files(directory, prefix=_STAGE_PREFIX, last=(CONFIG_NAME,)) as stage:
            save_file(self.state_dict_to_save(), str(stage / WEIGHTS_NAME), metadata={"format": "pt", "qlip": FORMAT})
            (stage / CONFIG_NAME).write_text(json.dumps(self.cfg.to_dict(), indent=1) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, text_encoder: nn.Module) -> T2IModel:
        """Build from a directory written by :meth:`save_pretrained`, with the frozen text tower it was made with."""
        directory = Path(directory)
        model = cls(read_generator_config(directory), text_encoder)
        state = read_weight_file(directory / WEIGHTS_NAME)
        expected = set(model.state_dict_to_save())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise GeneratorDirectoryError(f"{directory / WEIGHTS_NAME} does not match its config: missing "
                                          f"{missing[:5]}, unexpected {unexpected[:5]}")  # fmt: skip
        model.load_state_dict(state, strict=False)
        return model.eval()


def read_generator_config(directory: str | Path) -> T2IConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise GeneratorDirectoryError(f"{directory} has no {CONFIG_NAME}; is it a generator directory?")
    try:
        return T2IConfig.from_dict(json.loads(path.read_text()))
    except GeneratorDirectoryError as e:
        raise GeneratorDirectoryError(f"{path}: {e}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise GeneratorDirectoryError(f"{path} is not a valid generator config: {e}") from None


def is_generator_directory(directory: Path) -> bool:
    try:
        read_generator_config(directory)
    except (OSError, ValueError):
        return False
    return True


def check_generator_target(directory: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder that is not a generator directory (unless ``overwrite``)."""
    check_model_target(directory, is_ours=is_generator_directory, error=GeneratorDirectoryError, what="generator",
                       staging_prefix=_STAGE_PREFIX, overwrite=overwrite, overwrite_hint=", or overwrite=True")
