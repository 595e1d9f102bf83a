"""A real captioned image set that works offline: the Open Clip Art Library as Debian packages it.

``openclipart-png`` holds PNG renderings in ~22 category folders; ``openclipart-svg`` the SVG sources, whose RDF
metadata give each drawing a title, sometimes a description, and keywords. :func:`prepare_openclipart` pairs every
PNG with its SVG, builds a caption from that metadata only, and writes pre-resized copies (so training never decodes
a multi-megapixel PNG per step), two caption lists (``train.csv``, ``heldout.csv``) and ``manifest.json``.

Captions: ``"<title>. <description>. <keyword>, <keyword>."`` in lower case, each part only when it describes the
drawing: a title that looks like a file name (``smiley111``, ``jigsaw_red_10``), names a collection
(``Part of the Flat Icon Collection``) or is shared by more than :data:`SERIES_TITLE_LIMIT` drawings is dropped; a
description is kept when it is short and is not an e-mail address or a link; keywords that describe the file rather
than the picture (``hash``, ``theme``, ...) are dropped. Nothing is invented: every word comes from the metadata.

Images are flattened onto white and padded to a ``size`` x ``size`` square with the project's pad rule
(:func:`qlip.transforms.fit_and_pad`): clip art is drawn to the edges of its canvas and its captions describe the
whole drawing, so a centre crop would cut off what the caption names. The stored copies are square, so
``data.resize`` crop and pad give the same picture downstream.

Many drawings come in series whose metadata are the same (1,375 star polygons all "stars, shapes, geometry."):
at most ``max_per_caption`` drawings keep one caption, so the batches of contrastive training are not full of
identical captions. The held-out split is fixed: the drawings of a caption are held out together when the sha256 of
the caption falls in the first ``heldout_fraction`` of the hash range, so every held-out caption is new to
training.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import logging
import os
import re
import statistics
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import atomic_write, sha256_file, write_json_atomic, write_text_atomic
from ..transforms import ImageLoadError, fit_and_pad, load_image, parse_background

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "/usr/share/openclipart"
PACKAGES = ("openclipart-png", "openclipart-svg")
INSTALL_HINT = "apt install openclipart-png openclipart-svg"
MANIFEST_KIND = "qlip-openclipart"
MANIFEST_NAME = "manifest.json"
# What the package's copyright file dedicates every drawing to, for the few whose metadata names no license.
PACKAGE_LICENSE = "public domain (the package's dedication)"
CSV_COLUMNS = ("image", "caption", "category", "title", "keywords", "license", "source")
SPLIT_FILES = {"train": "train.csv", "heldout": "heldout.csv"}

SERIES_TITLE_LIMIT = 50  # a title more drawings share than this names a series ("gramastar"), not a drawing
MAX_DESCRIPTION_CHARS = 100
MAX_KEYWORDS = 6
# Keywords and title words about the file or its collection, not about what is drawn.
FILE_WORDS = frozenset({"hash", "unsorted", "special", "theme", "themes", "magick", "mapsym", "mimetypes",
                        "mime-types", "appicon", "clipart", "cliparts", "svg", "png", "iconset", "collection",
                        "submission", "signs_and_symbols", "lemon_theme_icon"})  # fmt: skip
# Skip reasons that mean a file could not be read (the command exits 1); the others are choices (size, metadata).
UNREADABLE = frozenset({"empty", "unknown_format", "corrupt", "missing_file", "bad_svg"})

_NS = {"dc": "http://purl.org/dc/elements/1.1/", "cc": "http://web.resource.org/cc/",
       "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#"}  # fmt: skip
_RDF_RESOURCE = f"{{{_NS['rdf']}}}resource"
_RDF_ABOUT = f"{{{_NS['rdf']}}}about"
_BYLINE = re.compile(r"^clip\s*art\s+by\s+[^-]+?\s+-\s+", re.IGNORECASE)  # "Clipart by Nicu Buculei - bee"
_MIXED_TOKEN = re.compile(r"[a-z]\d|\d[a-z]", re.IGNORECASE)  # "smiley111", "fc23", "r16"
_NOT_PROSE = re.compile(r"@|https?:|www\.|hash\(|0x[0-9a-f]|#\d", re.IGNORECASE)  # addresses, Perl refs, "#305"


class OpenClipArtError(ValueError):
    """The source or output folder cannot be used; the message says what to do."""


@dataclass
class ClipArtMetadata:
    """What an SVG's RDF block says about its drawing (empty strings where it says nothing)."""

    title: str = ""
    description: str = ""
    keywords: list[str] = field(default_factory=list)
    license: str = ""
    creator: str = ""


def _text(value: str | None) -> str:
    """Metadata text with entities decoded and runs of white space made one space."""
    return " ".join(html.unescape(value or "").split())


def read_svg_metadata(path: str | os.PathLike) -> ClipArtMetadata:
    """The title, description, keywords, license and creator of an SVG's ``cc:Work`` (stops reading at the end of
    its ``metadata`` element, so the drawing itself is never parsed).

    Raises:
        ValueError: the file is not well-formed XML.
    """
    meta = ClipArtMetadata()
    license_about = ""
    try:
        for _, elem in ET.iterparse(path, events=("end",)):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "Work":
                meta.title = _text(elem.findtext("dc:title", "", _NS))
                meta.description = _text(elem.findtext("dc:description", "", _NS))
                meta.keywords = [_text(li.text) for li in elem.findall("dc:subject/rdf:Bag/rdf:li", _NS)]
                meta.creator = _text(elem.findtext("dc:creator/cc:Agent/dc:title", "", _NS))
                lic = elem.find("cc:license", _NS)
                if lic is not None:
                    meta.license = (lic.get(_RDF_RESOURCE) or _text(lic.text)).strip()
            elif tag == "License":
                license_about = license_about or (elem.get(_RDF_ABOUT) or "")
            elif tag == "metadata":
                break
    except ET.ParseError as e:
        raise ValueError(f"not well-formed XML ({e})") from e
    meta.license = meta.license or license_about
    return meta


def is_file_name_like(text: str) -> bool:
    """A name a program gave, not a description: ``jigsaw_red_10``, ``smiley111``, ``button-green``, ``x.svg``."""
    if not text:
        return True
    if "_" in text or _MIXED_TOKEN.search(text) or _NOT_PROSE.search(text):
        return True
    if re.search(r"\.(svg|png|jpe?g|gif)$", text, re.IGNORECASE):
        return True
    return " " not in text and bool(re.search(r"[-.]", text.strip(".")))


def _names_a_collection(title: str) -> bool:
    return any(word in FILE_WORDS for word in re.findall(r"[a-z_-]+", title.lower()))


def clean_title(title: str, series_titles: frozenset[str] = frozenset()) -> str:
    """The title as a description of the drawing, or "" when it is a file name, a collection or a series name."""
    title = _BYLINE.sub("", _text(title)).strip(" .")
    if re.fullmatch(r"[A-Za-z]+(?:[_-][A-Za-z]+)+", title) or "_" in title and not re.search(r"\d", title):
        title = re.sub(r"[_-]", " ", title)  # "Scrub_Brush", "pill-button-yellow": words a program joined
    if not title or title.lower() in series_titles or is_file_name_like(title) or _names_a_collection(title):
        return ""
    return title


def clean_description(description: str, title: str) -> str:
    """A short description that is prose and not the title again; "" otherwise."""
    text = _text(description).rstrip(" .;:,!")
    if not text or len(text) > MAX_DESCRIPTION_CHARS or _NOT_PROSE.search(text):
        return ""
    if " " not in text and is_file_name_like(text):  # one word: "x_01.svg" is no description, "battery" is
        return ""
    return "" if text.lower() == title.lower() else text


def clean_keywords(keywords: list[str], creator: str = "", said: str = "") -> list[str]:
    """Keywords about the picture: no file or collection words, no identifiers, no author names, nothing the title
    or description already says; underscores become spaces; at most :data:`MAX_KEYWORDS`, in the metadata's order."""
    out: list[str] = []
    said_words = set(re.findall(r"[a-z]+", said.lower()))
    for word in keywords:
        word = _text(word).strip(" .,").lower()
        if not word or word in FILE_WORDS or word == creator.lower() or _MIXED_TOKEN.search(word):
            continue
        if _NOT_PROSE.search(word) or len(word.split()) > 3 or not re.search(r"[a-z]", word):
            continue
        word = word.replace("_", " ")
        if word in out or set(word.split()) <= said_words:
            continue
        out.append(word)
        if len(out) == MAX_KEYWORDS:
            break
    return out


def build_caption(meta: ClipArtMetadata, series_titles: frozenset[str] = frozenset()) -> tuple[str, str, list[str]]:
    """(caption, cleaned title, kept keywords) of a drawing; the caption is "" when the metadata says nothing
    usable. Example: ``"red apple with a green leaf. fruit, food."``."""
    title = clean_title(meta.title, series_titles)
    description = clean_description(meta.description, title)
    keywords = clean_keywords(meta.keywords, meta.creator, f"{title} {description}")
    parts = [p for p in (title, description, ", ".join(keywords)) if p]
    return (". ".join(parts) + "." if parts else "").lower(), title, keywords


@dataclass
class ClipArtEntry:
    """One drawing: its PNG (relative to the package's ``png`` folder), its SVG (or None) and its category."""

    png: str
    svg: Path | None
    category: str


def check_source(src: str | os.PathLike) -> Path:
    """The package folder, with its ``png`` and ``svg`` folders; an :class:`OpenClipArtError` naming the install
    command otherwise."""
    src = Path(src)
    missing = [name for name in ("png", "svg") if not (src / name).is_dir()]
    if missing:
        raise OpenClipArtError(f"{src} has no {' or '.join(f'{m}/ folder' for m in missing)}: install the Open Clip "
                               f"Art Library with `{INSTALL_HINT}` (Debian/Ubuntu) or point --src at its "
                               "folder")  # fmt: skip
    return src


def find_clipart(src: Path) -> list[ClipArtEntry]:
    """Every drawing once, sorted by path: the package links a drawing into further categories with symlinks, which
    are skipped (its category is the folder of the real file)."""
    entries = []
    png_root = src / "png"
    for dirpath, dirnames, filenames in os.walk(png_root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix.lower() != ".png" or path.is_symlink():
                continue
            rel = path.relative_to(png_root)
            svg = src / "svg" / rel.with_suffix(".svg")
            entries.append(ClipArtEntry(rel.as_posix(), svg if svg.is_file() else None, rel.parts[0]
                                        if len(rel.parts) > 1 else "uncategorized"))  # fmt: skip
    return sorted(entries, key=lambda e: e.png)


def package_versions() -> dict[str, str | None]:
    """The installed Debian versions of the two packages (None where dpkg does not know them)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            run = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True,
                                 timeout=30, check=False)  # fmt: skip
            versions[name] = run.stdout.strip() if run.returncode == 0 and run.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            versions[name] = None
    return versions


def _hash_fraction(text: str) -> float:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16) / float(1 << 48)


def assign_split(rows: list[dict[str, str]], heldout_fraction: float) -> None:
    """Set each row's ``split`` to "train" or "heldout" by the sha256 of its caption: the drawings that share a
    caption are held out together, so no held-out caption is seen in training."""
    for r in rows:
        r["split"] = "heldout" if _hash_fraction(r["caption"]) < heldout_fraction else "train"


def cap_per_caption(rows: list[dict[str, str]], limit: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(kept, dropped): at most ``limit`` rows per caption (0: no limit), the ones whose image path hashes lowest,
    so a series of near-identical drawings does not fill the batches with one caption."""
    if limit < 1:
        return rows, []
    ranked = sorted(rows, key=lambda r: (r["caption"], _hash_fraction(r["image"]), r["image"]))
    seen: Counter[str] = Counter()
    keep: set[str] = set()
    for r in ranked:
        seen[r["caption"]] += 1
        if seen[r["caption"]] <= limit:
            keep.add(r["image"])
    return [r for r in rows if r["image"] in keep], [r for r in rows if r["image"] not in keep]


def _csv_text(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def is_openclipart_output(folder: Path) -> bool:
    """Whether ``folder`` holds a manifest this module wrote."""
    try:
        return json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8")).get("kind") == MANIFEST_KIND
    except (OSError, ValueError, AttributeError):
        return False


def check_output(out: str | os.PathLike) -> Path:
    """An output folder that is new, empty, or one this module wrote; what it did not write is never replaced."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OpenClipArtError(f"--out {out} is a file; name a folder")
    if out.is_dir() and any(out.iterdir()) and not is_openclipart_output(out):
        held = sorted(p.name for p in out.iterdir())
        raise OpenClipArtError(f"--out {out} is not empty and was not written by qlip data openclipart (it holds "
                               f"{', '.join(held[:5])}{', ...' if len(held) > 5 else ''}); choose a new or empty "
                               "folder")  # fmt: skip
    return out


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": min(values), "median": statistics.median(values), "mean": round(statistics.fmean(values), 2),
            "max": max(values)}  # fmt: skip


@dataclass
class Skipped:
    """A drawing left out: its PNG path (relative to ``png/``), the reason and the detail."""

    png: str
    reason: str
    detail: str


def prepare_openclipart(src: str | os.PathLike, out: str | os.PathLike, *, size: int = 128, min_side: int = 32,
                        heldout_fraction: float = 0.1, max_per_caption: int = 10, max_pixels: int | None = None,
                        progress: Callable[[Iterator[Any], int], Iterator[Any]] | None = None,
                        ) -> dict[str, Any]:  # fmt: skip
    """Write the clip-art caption lists, images and manifest into ``out`` (see the module docstring).

    Args:
        src: the package folder (``/usr/share/openclipart``) with ``png/`` and ``svg/``.
        out: the output folder: new, empty, or written by this function before.
        size: side of the stored square images.
        min_side: drawings whose PNG is smaller than this on a side are skipped ("too_small").
        heldout_fraction: the share of captions (by hash) whose drawings are held out.
        max_per_caption: at most this many drawings per caption (0: all); the others are skipped
            ("duplicate_caption").
        max_pixels: PNGs with more pixels are skipped ("decompression_bomb"); None: PIL's limit.
        progress: wraps the iteration over drawings (a progress bar), given the iterator and the total.

    Returns:
        The manifest (also written to ``out/manifest.json``): counts, skipped files, caption statistics, the
        per-category and per-split sizes, and the sha256 of each CSV.

    Raises:
        OpenClipArtError: the package is not installed at ``src``, or ``out`` holds files this did not write.
    """
    if size < 1 or min_side < 0 or max_per_caption < 0 or not 0 <= heldout_fraction < 1:
        raise ValueError(f"need size >= 1, min_side >= 0, max_per_caption >= 0 and heldout_fraction in [0, 1), got "
                         f"{size}, {min_side}, {max_per_caption}, {heldout_fraction}")  # fmt: skip
    src = check_source(src)
    out = check_output(out)
    entries = find_clipart(src)
    if not entries:
        raise OpenClipArtError(f"{src / 'png'} holds no PNG files; reinstall with `{INSTALL_HINT}`")
    white = parse_background("white")
    settings = {"size": size, "min_side": min_side, "heldout_fraction": heldout_fraction,
                "max_per_caption": max_per_caption, "max_pixels": max_pixels, "background": "white",
                "resize": "pad"}  # fmt: skip
    # Claimed first, so that an interrupted run can be finished (or redone) in the same folder.
    write_json_atomic(out / MANIFEST_NAME, {"kind": MANIFEST_KIND, "complete": False, "settings": settings})
    metadata: dict[str, ClipArtMetadata | Skipped] = {}
    for e in entries:
        if e.svg is None:
            metadata[e.png] = Skipped(e.png, "no_svg", f"no {Path(e.png).with_suffix('.svg')} under {src / 'svg'}")
            continue
        try:
            metadata[e.png] = read_svg_metadata(e.svg)
        except (OSError, ValueError) as err:
            metadata[e.png] = Skipped(e.png, "bad_svg", f"{e.svg}: {err}")
    titles = Counter(clean_title(m.title).lower() for m in metadata.values() if isinstance(m, ClipArtMetadata))
    series = frozenset(t for t, n in titles.items() if t and n > SERIES_TITLE_LIMIT)

    skipped: list[Skipped] = []
    candidates: list[dict[str, Any]] = []
    for e in entries:  # captions first (cheap), so that only the drawings kept are decoded
        meta = metadata[e.png]
        if isinstance(meta, Skipped):
            skipped.append(meta)
            continue
        caption = build_caption(meta, series)[0]
        if not caption:
            skipped.append(Skipped(e.png, "no_caption", "the metadata has no usable title, description or keyword"))
            continue
        candidates.append({"image": f"images/{e.png}", "caption": caption, "entry": e, "meta": meta})
    candidates, dropped = cap_per_caption(candidates, max_per_caption)
    skipped += [Skipped(c["entry"].png, "duplicate_caption", f"more than {max_per_caption} drawings are captioned "
                        f"{c['caption']!r}") for c in dropped]  # fmt: skip

    rows: list[dict[str, str]] = []
    source_sizes: list[tuple[int, int]] = []
    iterator: Iterator[dict[str, Any]] = iter(candidates)
    if progress is not None:
        iterator = progress(iterator, len(candidates))
    for c in iterator:
        e, meta = c["entry"], c["meta"]
        try:
            image = load_image(src / "png" / e.png, max_pixels=max_pixels, background=white)
        except ImageLoadError as err:
            skipped.append(Skipped(e.png, err.reason, str(err)))
            continue
        if min(image.size) < min_side:
            skipped.append(Skipped(e.png, "too_small", f"{image.size[0]}x{image.size[1]} is under --min-side "
                                                       f"{min_side}"))  # fmt: skip
            continue
        source_sizes.append(image.size)
        square = fit_and_pad(image, size, white)
        atomic_write(out / c["image"], lambda tmp, img=square: img.save(tmp, format="PNG"))
        rows.append({"image": c["image"], "caption": c["caption"], "category": e.category, "title": meta.title,
                     "keywords": ", ".join(k for k in meta.keywords if k), "source": f"png/{e.png}",
                     "license": meta.license or PACKAGE_LICENSE})  # fmt: skip
    skipped.sort(key=lambda item: item.png)
    assign_split(rows, heldout_fraction)
    sha = {}
    for split, name in SPLIT_FILES.items():
        write_text_atomic(out / name, _csv_text([r for r in rows if r["split"] == split]))
        sha[name] = sha256_file(out / name)
    reasons = Counter(s.reason for s in skipped)
    words = [len(r["caption"].split()) for r in rows]
    manifest = {
        "kind": MANIFEST_KIND,
        "source": str(src),
        "packages": package_versions(),
        "complete": True,
        "settings": settings,
        "found": len(entries),
        "images": len(rows),
        "splits": {split: sum(r["split"] == split for r in rows) for split in SPLIT_FILES},
        "categories": dict(sorted(Counter(r["category"] for r in rows).items())),
        "skipped": dict(sorted(reasons.items())),
        "skipped_files": [{"png": s.png, "reason": s.reason, "detail": s.detail} for s in skipped],
        "unreadable": sum(n for r, n in reasons.items() if r in UNREADABLE),
        "caption_words": _stats(words),
        "caption_chars": _stats([len(r["caption"]) for r in rows]),
        "distinct_captions": len({r["caption"] for r in rows}),
        "source_pixels": _stats([w * h for w, h in source_sizes]),
        "files": {name: {"rows": sum(r["split"] == split for r in rows), "sha256": sha[name]}
                  for split, name in SPLIT_FILES.items()},  # fmt: skip
    }
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest
