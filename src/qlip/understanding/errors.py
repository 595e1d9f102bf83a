"""Errors of the understanding package: each is a ValueError with a one-line message saying what to fix."""

from __future__ import annotations


class UnderstandingError(ValueError):
    """An input the vision-language model cannot use: no image, an unreadable one, a prompt too long for the
    context, parts that do not fit together (tower width or grid vs projector), a missing or invalid model file."""
