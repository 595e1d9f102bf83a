"""Image-caption pairs listed in a CSV, TSV or JSONL file.

One row per image: a path column and a caption column (names configurable; by default the first of
``filepath, image, path, file, image_path`` and of ``caption, text, title``). Relative paths are resolved against
the folder of the list file. The file is decoded with ``surrogateescape`` so a caption whose bytes are not UTF-8
is caught per row (bad "non_utf8_caption") instead of failing the whole file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..transforms import Background, ImageLoadError
from .sample import Sample, bad_marker, read_image_checked

logger = logging.getLogger(__name__)

PATH_COLUMNS = ("filepath", "image", "path", "file", "image_path", "filename")
CAPTION_COLUMNS = ("caption", "text", "title")
CAPTION_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl")


def _has_undecodable(text: str) -> bool:
    # surrogateescape maps every invalid byte to a lone surrogate in U+DC80..U+DCFF.
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _pick(columns: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, file: Path) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{file}: no {what} column named {wanted!r}; the columns are {columns}")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    raise ValueError(f"{file}: cannot find the {what} column among {columns}; name it with the {what}_key option")


def _label_text(value: Any) -> str | None:
    """A label cell as text (None when missing or blank); JSON numbers become their decimal form."""
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).strip()
    return text or None


def _is_whole_number(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def read_caption_rows(file: str | os.PathLike) -> tuple[list[str], list[dict[str, Any] | None]]:
    """Parse a CSV/TSV/JSONL caption file into (column names, rows); a row that cannot be parsed is None."""
    file = Path(file)
    suffix = file.suffix.lower()
    if suffix not in CAPTION_FILE_SUFFIXES:
        raise ValueError(f"{file}: caption lists must end in {CAPTION_FILE_SUFFIXES}, got {suffix!r}")
    text = file.read_bytes().decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]  # a byte-order mark written by spreadsheet programs
    if suffix == ".jsonl":
        rows: list[dict[str, Any] | None] = []
        columns: dict[str, None] = {}
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                rows.append(None)
                continue
            if not isinstance(row, dict):
                rows.append(None)
                continue
            columns.update(dict.fromkeys(row))
            rows.append(row)
        return list(columns), rows
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
    return list(reader.fieldnames or []), [dict(row) for row in reader]


@dataclass
class CaptionFileDataset(Dataset):
    """Image-caption pairs from a CSV / TSV / JSONL list.

    Attributes:
        file: the list file.
        image_key: name of the path column (None: the first of PATH_COLUMNS present).
        caption_key: name of the caption column (None: the first of CAPTION_COLUMNS present).
        label_key: optional name of a label column. When every row's value is a whole number, the label is that
            number (``classnames`` is None); otherwise the values are class names: ``classnames`` are the distinct
            values sorted, and a row's label is the position of its value among them.
        min_size: images smaller than this on either side are bad ("too_small").
        max_pixels: images with more pixels are bad ("decompression_bomb"); None uses PIL's limit.
        background: the color transparent images are flattened onto (white, black or #rrggbb).
    """

    file: str | os.PathLike
    image_key: str | None = None
    caption_key: str | None = None
    label_key: str | None = None
    min_size: int = 1
    max_pixels: int | None = None
    background: Background = "white"

    def __post_init__(self) -> None:
        self.file = Path(self.file)
        if not self.file.is_file():
            raise FileNotFoundError(f"caption list {self.file} does not exist")
        columns, self.rows = read_caption_rows(self.file)
        if not self.rows:
            raise ValueError(f"caption list {self.file} has no rows")
        self.image_key = _pick(columns, self.image_key, PATH_COLUMNS, "image", self.file)
        self.caption_key = _pick(columns, self.caption_key, CAPTION_COLUMNS, "caption", self.file)
        self.classnames: list[str] | None = None
        if self.label_key is not None:
            _pick(columns, self.label_key, (), "label", self.file)
            values = {_label_text(row.get(self.label_key)) for row in self.rows if row is not None} - {None}
            if not values:
                raise ValueError(f"{self.file}: the label column {self.label_key!r} is empty in every row")
            if not all(_is_whole_number(v) for v in values):
                self.classnames = sorted(values)
                self._label_of = {name: i for i, name in enumerate(self.classnames)}
        self.base = self.file.parent

    def __len__(self) -> int:
        return len(self.rows)

    def caption_of(self, index: int) -> str | None:
        """The caption row ``index`` gives, stripped (None when it has no usable one); reads no image."""
        row = self.rows[index]
        caption = None if row is None else row.get(self.caption_key)
        if not isinstance(caption, str) or not caption.strip() or _has_undecodable(caption):
            return None
        return caption.strip()

    def image_path_of(self, index: int) -> str | None:
        """The image path row ``index`` names, as written in the list (None for an unparsable row)."""
        row = self.rows[index]
        value = None if row is None else row.get(self.image_key)
        return value if isinstance(value, str) else None

    def first_row_per_image(self) -> list[int]:
        """Row indices keeping the first row of each image (a list may give one image several captions)."""
        seen: set[str] = set()
        keep = []
        for i in range(len(self.rows)):
            path = self.image_path_of(i)
            if path is None or path not in seen:
                keep.append(i)
                if path is not None:
                    seen.add(path)
        return keep

    def __getitem__(self, index: int) -> Sample:
        row = self.rows[index]
        key = f"{self.file.name}:{index + 1}"
        if row is None:
            return bad_marker(key, "bad_row", f"row {index + 1} of {self.file} is not a JSON object")
        rel = row.get(self.image_key)
        if not isinstance(rel, str) or not rel.strip():
            return bad_marker(key, "missing_file", f"row {index + 1} of {self.file} has no image path")
        if _has_undecodable(rel):
            return bad_marker(key, "bad_row", f"row {index + 1} of {self.file}: image path is not valid UTF-8")
        key = rel
        caption = row.get(self.caption_key)
        if isinstance(caption, str) and _has_undecodable(caption):
            return bad_marker(key, "non_utf8_caption", f"row {index + 1} of {self.file}")
        if not isinstance(caption, str) or not caption.strip():
            return bad_marker(key, "missing_caption", f"row {index + 1} of {self.file}")
        label = None
        if self.label_key is not None:
            value = _label_text(row.get(self.label_key))
            if value is None:
                return bad_marker(key, "bad_row", f"row {index + 1} of {self.file}: no {self.label_key!r} label")
            label = self._label_of[value] if self.classnames is not None else int(value)
        path = Path(rel) if os.path.isabs(rel) else self.base / rel
        try:
            image = read_image_checked(path, str(path), min_size=self.min_size, max_pixels=self.max_pixels,
                                       background=self.background)  # fmt: skip
        except ImageLoadError as err:
            return bad_marker(key, err.reason, str(err))
        return {"image": image, "caption": caption.strip(), "label": label, "key": key}
