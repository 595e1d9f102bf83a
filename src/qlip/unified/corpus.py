"""The English text corpus the language model learns from: the docstrings of the Python standard library.

Why this corpus: it is on every machine that runs qlip (no download, no extra package), it is real English prose
(explanations, not code alone), and it is about as large as a 2-core CPU can learn from in minutes (a few MB).
It differs between Python versions, so a corpus records the version and the sha256 of its text
(:attr:`TextCorpus.sha256`): a perplexity is comparable only between runs with the same digest.

Documents are the docstrings of a fixed list of modules (:data:`STDLIB_MODULES`), their public classes,
functions and methods, in sorted order; a document goes to the held-out split when the sha256 of its name falls in
the held-out share (so the split does not move when other documents change).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import platform
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# Modules that import without side effects on every platform and carry much prose. No GUI, no "this".
STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "doctest", "email", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt",
    "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http.client", "http.cookies",
    "http.server", "imaplib", "importlib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
    "logging.handlers", "lzma", "mailbox", "math", "mimetypes", "multiprocessing", "netrc", "numbers",
    "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib",
    "poplib", "pprint", "pydoc", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "trace", "traceback", "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings",
    "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
)  # fmt: skip
MIN_DOC_CHARS = 40  # shorter docstrings ("Return self.") are mostly boilerplate


@dataclass
class TextCorpus:
    """Documents of the train and held-out splits, with what identifies the corpus.

    Attributes:
        name: the corpus name ("stdlib-docstrings").
        train, held_out: the documents of each split.
        python_version: the Python the docstrings were read from.
        sha256: digest of every document (names and texts, in order): equal digests mean equal corpora.
    """

    name: str
    spec: str = ""
    held_out_share: float = 0.05
    train: list[str] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)
    python_version: str = ""
    sha256: str = ""

    def describe(self) -> dict[str, object]:
        """What a model directory records about the corpus it learnt from."""
        chars = sum(map(len, self.train)) + sum(map(len, self.held_out))
        return {"name": self.name, "spec": self.spec, "held_out_share": self.held_out_share,
                "python_version": self.python_version, "sha256": self.sha256,
                "documents": len(self.train) + len(self.held_out), "held_out_documents": len(self.held_out),
                "characters": chars}  # fmt: skip


def _members(module: object) -> list[tuple[str, object]]:
    """Public classes and functions defined in ``module``, and the public methods of those classes, sorted."""
    out: list[tuple[str, object]] = []
    modname = getattr(module, "__name__", "")
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != modname:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            out.append((name, obj))
        if inspect.isclass(obj):
            for mname, meth in sorted(vars(obj).items()):
                if not mname.startswith("_") and inspect.isfunction(meth):
                    out.append((f"{name}.{mname}", meth))
    return out


def _in_held_out(name: str, share: float) -> bool:
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def stdlib_docstrings(held_out: float = 0.05, modules: tuple[str, ...] = STDLIB_MODULES) -> TextCorpus:
    """The docstring corpus of this Python (see the module docstring); ``held_out``: the share of documents kept
    out of training for perplexity."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must lie in (0, 1), got {held_out}")
    corpus = TextCorpus("stdlib-docstrings", spec="stdlib-docstrings", held_out_share=held_out,
                        python_version=platform.python_version())
    digest, seen = hashlib.sha256(), set()
    for modname in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(modname)
        except ImportError:  # a module this build of Python lacks (e.g. without sqlite3): the digest shows it
            log.info("corpus: %s is not available on this Python", modname)
            continue
        for name, obj in [(modname, module), *((f"{modname}.{n}", o) for n, o in _members(module))]:
            doc = inspect.getdoc(obj) if obj is module else obj.__doc__ and inspect.cleandoc(obj.__doc__)
            if not doc or len(doc) < MIN_DOC_CHARS or doc in seen:
                continue
            seen.add(doc)
            digest.update(f"{name}\0{doc}\0".encode())
            (corpus.held_out if _in_held_out(name, held_out) else corpus.train).append(doc)
    corpus.sha256 = digest.hexdigest()
    return corpus


def text_file(path: str | Path, held_out: float = 0.05) -> TextCorpus:
    """A UTF-8 text file as a corpus: documents are separated by blank lines (a document's name for the split is
    its index)."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must lie in (0, 1), got {held_out}")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    docs = [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
    corpus = TextCorpus("text-file", spec=str(path), held_out_share=held_out, python_version=platform.python_version())
    digest = hashlib.sha256()
    for i, doc in enumerate(docs):
        digest.update(f"{i}\0{doc}\0".encode())
        (corpus.held_out if _in_held_out(str(i), held_out) else corpus.train).append(doc)
    corpus.sha256 = digest.hexdigest()
    if not corpus.train or not corpus.held_out:
        raise ValueError(f"{path} holds {len(docs)} documents (paragraphs): too few for a train and a held-out "
                         "split; give more text, documents separated by blank lines")  # fmt: skip
    return corpus


CORPORA = {"stdlib-docstrings": stdlib_docstrings}


def load_corpus(spec: str, held_out: float = 0.05) -> TextCorpus:
    """The corpus ``spec`` names: one of :data:`CORPORA`, or the path of a UTF-8 text file."""
    if spec in CORPORA:
        return CORPORA[spec](held_out)
    if Path(spec).is_file():
        return text_file(spec, held_out)
    raise ValueError(f"unknown text corpus {spec!r}; give one of {sorted(CORPORA)} or a UTF-8 text file")
