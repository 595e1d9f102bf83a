"""fileio: atomic writes that follow the umask (mkstemp/mkdtemp alone give 0600 / 0700)."""

from __future__ import annotations

import os
import stat

import pytest

from qlip.fileio import atomic_write, make_temp_dir, replace_files, write_json_atomic, write_text_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_files_follow_umask(tmp_path, umask_022):
    p = write_text_atomic(tmp_path / "a" / "x.txt", "hi")
    assert p.read_text() == "hi" and _mode(p) == 0o644
    os.umask(0o077)
    q = write_json_atomic(tmp_path / "y.json", {"a": 1})
    assert _mode(q) == 0o600
    d = make_temp_dir(tmp_path, ".t-")
    assert _mode(d) == 0o700
    os.umask(0o022)
    assert _mode(make_temp_dir(tmp_path, ".t-")) == 0o755


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def boom(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, boom, durable=True)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_replace_files_renames_all_or_nothing_and_keeps_other_files(tmp_path, umask_022):
    (tmp_path / "a.json").write_text("old a")
    (tmp_path / "b.bin").write_text("old b")
    (tmp_path / "notes.txt").write_text("not ours")
    with pytest.raises(OSError, match="disk full"):
        with replace_files(tmp_path, last=("a.json",)) as stage:
            (stage / "b.bin").write_text("new b")
            raise OSError("disk full")  # before the second file: neither is replaced
    assert (tmp_path / "b.bin").read_text() == "old b"
    with replace_files(tmp_path, last=("a.json",), durable=True) as stage:
        (stage / "a.json").write_text("new a")
        (stage / "b.bin").write_text("new b")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a.json": "new a", "b.bin": "new b",
                                                                   "notes.txt": "not ours"}  # no staging folder
    assert _mode(tmp_path / "a.json") == 0o644


def test_model_targets_of_every_family_refuse_what_they_did_not_write(tmp_path):
    """Generator, language-model and VLM directories share one rule: a file, or a non-empty folder of something else, is
    refused (one line naming what it holds); an empty folder, a staging leftover, or overwrite=True is accepted."""
    from qlip.generation.model import _STAGE_PREFIX as T2I_STAGE
    from qlip.generation.model import GeneratorDirectoryError, check_generator_target
    from qlip.understanding.errors import UnderstandingError
    from qlip.understanding.pipeline import check_vlm_target
    from qlip.unified.pipeline import UnifiedDirectoryError, check_unified_target

    for check, error, stage in ((lambda d, o=False: check_generator_target(d, o), GeneratorDirectoryError, T2I_STAGE),
                                (check_unified_target, UnifiedDirectoryError, None),
                                (lambda d, o=False: o or check_vlm_target(d), UnderstandingError, None)):  # fmt: skip
        root = tmp_path / error.__name__
        root.mkdir()
        check(root / "new")  # does not exist yet
        (root / "empty").mkdir()
        check(root / "empty")
        (root / "file").write_text("x")
        with pytest.raises(error, match="is a file"):
            check(root / "file")
        (root / "photos").mkdir()
        (root / "photos" / "cat.jpg").write_bytes(b"\xff")
        with pytest.raises(error, match=r"not empty .* \(it holds cat\.jpg\)"):
            check(root / "photos")
        check(root / "photos", True)  # overwrite: the caller replaces only its own files
        if stage is not None:
            (root / "staged").mkdir()
            (root / "staged" / f"{stage}1").mkdir()
            check(root / "staged")
