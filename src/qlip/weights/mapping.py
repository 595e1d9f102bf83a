"""The key-mapping engine: rules that place a foreign state dict into a model, and the report of what they did.

A :class:`KeyMap` is an ordered list of :class:`KeyRule` (a regex over the source key -> one or more of our keys,
each with a tensor transform) plus patterns of keys to skip (deterministic tables a model recomputes). The first
rule that matches wins; a fused projection (q/k/v in one tensor) is one rule with three targets. The released
QLIP layout (``released.py``), the CLIP family (``clip.py``) and our own format (:data:`IDENTITY`) are tables for
this one engine, and :func:`load_into` loads any of them with one :class:`LoadReport`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .files import WeightsMismatchError

log = logging.getLogger(__name__)

Transform = Callable[[Tensor], Tensor]


def copy(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class KeyRule:
    """Source keys matching ``pattern`` (a full-match regex) go to each target ``(our key template, transform)``;
    the templates are filled with the pattern's named groups."""

    pattern: str
    targets: tuple[tuple[str, Transform], ...]


def rule(pattern: str, target: str, transform: Transform = copy) -> KeyRule:
    """A rule with one target."""
    return KeyRule(pattern, ((target, transform),))


def _template_regex(template: str) -> str:
    # "{i}" is a layer index, "{p}" is weight|bias.
    return re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")


class KeyMap:
    """Ordered rules (first match wins) and the patterns of source keys that are skipped."""

    def __init__(self, rules: Iterable[KeyRule], skip: Iterable[str] = ()) -> None:
        self.rules = list(rules)
        self._compiled = [(re.compile(r.pattern + "$"), r.targets) for r in self.rules]
        self._skip = [re.compile(p + "$") for p in skip]

    @classmethod
    def from_templates(cls, pairs: Iterable[tuple[str, str]], skip: Iterable[str] = ()) -> KeyMap:
        """One-to-one renames, each ``(source template, our template)`` with ``{i}`` / ``{p}`` placeholders."""
        return cls((rule(_template_regex(src), ours) for src, ours in pairs), skip)

    def skips(self, key: str) -> bool:
        return any(p.match(key) for p in self._skip)

    def translate(self, key: str) -> list[tuple[str, Transform]]:
        """Our key(s) and transforms for one source key; [] when no rule places it."""
        for pattern, targets in self._compiled:
            m = pattern.match(key)
            if m:
                groups = m.groupdict()
                return [(template.format(**groups), fn) for template, fn in targets]
        return []

    def rename(self, key: str) -> str | None:
        """The single target of a one-to-one map, or None."""
        out = self.translate(key)
        return out[0][0] if out else None


# Deterministic tables some files carry (RoPE, position ids); models recompute them.
RECOMPUTED_KEYS = (r".*rope\.freqs_(cos|sin)", r".*position_ids")

# Our own format: every key is already ours.
IDENTITY = KeyMap([rule(r"(?P<key>.+)", "{key}")], skip=RECOMPUTED_KEYS)


@dataclass
class LoadReport:
    """What placing a state dict into a model did; :meth:`describe` lists the problems for a human."""

    placed: list[str] = field(default_factory=list)  # our keys filled
    unplaced: list[str] = field(default_factory=list)  # source keys with no place ("key" or "key -> our key")
    unfilled: list[str] = field(default_factory=list)  # model parameters (of the chosen parts) left unfilled
    shape_mismatch: list[str] = field(default_factory=list)  # "key: file (shape) vs network (shape)"
    skipped: list[str] = field(default_factory=list)  # recomputed tables, or parts not built / not asked for

    @property
    def ok(self) -> bool:
        return not (self.unplaced or self.unfilled or self.shape_mismatch)

    def describe(self, limit: int = 50) -> str:
        lines = []
        for title, keys in (
            ("keys in the file with no place in the model", self.unplaced),
            ("model parameters the file did not fill", self.unfilled),
            ("shape mismatches", self.shape_mismatch),
        ):
            if keys:
                shown = "\n    ".join(keys[:limit])
                more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
                lines.append(f"  {title} ({len(keys)}):\n    {shown}{more}")
        return "\n".join(lines)


def match_state(
    own: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    key_map: KeyMap = IDENTITY,
    *,
    chosen: Callable[[str], bool] = lambda key: True,
    absent: Callable[[str], bool] = lambda key: False,
) -> tuple[dict[str, Tensor], LoadReport]:
    """Place ``state`` onto the names and shapes of ``own`` without copying anything.

    Args:
        own: the model's state dict (names and shapes it needs).
        state: the state dict read from a file.
        key_map: the rules from the file's names to ours.
        chosen: our keys to fill; a target outside them is skipped and not counted as unfilled.
        absent: our keys of parts the model was built without; skipped rather than unplaced.

    Returns:
        (our key -> transformed tensor, the report).
    """
    report = LoadReport()
    mapped: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if key_map.skips(key):
            report.skipped.append(key)
            continue
        targets = key_map.translate(key)
        if not targets:
            report.unplaced.append(key)
            continue
        for ours, fn in targets:
            label = key if ours == key else f"{key} -> {ours}"
            if not chosen(ours) or (ours not in own and absent(ours)):
                report.skipped.append(label)
                continue
            if ours not in own:
                report.unplaced.append(label)
                continue
            value = fn(tensor)
            if tuple(value.shape) != tuple(own[ours].shape):
                report.shape_mismatch.append(f"{label}: file {tuple(value.shape)} vs network {tuple(own[ours].shape)}")
                continue
            mapped[ours] = value
            report.placed.append(ours)
    report.unfilled = sorted(k for k in own if chosen(k) and k not in mapped)
    return mapped, report


def _top(key: str) -> str:
    return key.split(".", 1)[0]


@torch.no_grad()
def load_into(
    model: nn.Module,
    state: Mapping[str, Tensor],
    key_map: KeyMap = IDENTITY,
    *,
    parts: Iterable[str] | None = None,
    strict: bool = True,
) -> LoadReport:
    """Copy ``state`` into ``model`` through ``key_map``; report every key and parameter that did not match.

    Keys of parts the model was built without (an attribute that is ``None``, e.g. the text tower of a
    tokenizer-only model) and targets outside ``parts`` are skipped, not errors.

    Args:
        model: the module to fill.
        state: the state dict read from a file.
        key_map: the file's layout.
        parts: top-level names of ``model`` to fill (``("visual", "logit_scale")``); None = all of it.
        strict: raise :class:`WeightsMismatchError` listing every problem instead of loading a partial match.
    """
    chosen_parts = None if parts is None else set(parts)
    own = model.state_dict()
    mapped, report = match_state(
        own,
        state,
        key_map,
        chosen=lambda key: chosen_parts is None or _top(key) in chosen_parts,
        absent=lambda key: getattr(model, _top(key), "absent") is None,
    )
    if strict and not report.ok:
        name = getattr(getattr(model, "cfg", None), "name", "model")
        raise WeightsMismatchError(f"the weights do not match the {name} model:\n" + report.describe())
    for key, value in mapped.items():
        own[key].copy_(value)
    if report.skipped:
        log.info("skipped %d keys (recomputed tables or parts not built)", len(report.skipped))
    return report


def check_state_dict(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], what: str, path: object) -> None:
    """Raise :class:`WeightsMismatchError` unless ``found`` has exactly the names and shapes of ``expected``.

    For networks whose weight files load unchanged (FID Inception, LPIPS).

    Args:
        expected: the network's own state dict.
        found: the state dict read from the file.
        what: the network's name, for the message.
        path: the file, for the message.
    """
    _, report = match_state(expected, found, KeyMap([rule(r"(?P<key>.+)", "{key}")]))
    if not report.ok:
        raise WeightsMismatchError(
            f"{path} does not fit the {what} network:\n{report.describe()}\n"
            "  Check that you passed the right file (see docs/metrics.md for names and checksums)."
        )
