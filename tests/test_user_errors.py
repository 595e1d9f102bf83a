"""A corpus of user mistakes: each ends in one line saying what was wrong (exit 2), or names the bad file (exit 1).

Every case runs the real entry point (``qlip.cli.main`` in-process, or a library call for the API cases) and checks
the exit code, the message, that no traceback was printed and that the user's own files are unchanged.
Training cases fail at start-up, before any step, so the corpus stays cheap.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from qlip.cli import main
from qlip.factory import create_model
from train_helpers import write_config

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """qlip-tiny with random weights and a tokenizer, in our save_pretrained format."""
    torch.manual_seed(0)
    return create_model("qlip-tiny").save_pretrained(tmp_path_factory.mktemp("model") / "tiny", tiny_tokenizer)


@dataclass
class W:
    """The workspace of one case: a fresh folder, the shared tiny model and the files the case must not change."""

    tmp: Path
    model_dir: Path
    kept: dict[Path, bytes | None] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return str(self.model_dir)

    def path(self, name: str) -> str:
        return str(self.tmp / name)

    def image(self, name: str = "x.png", seed: int = 0, size: int = 32) -> str:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(p)
        return str(p)

    def file(self, name: str, data: bytes | str = b"") -> str:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(p)

    def folder(self, name: str) -> str:
        p = self.tmp / name
        p.mkdir(parents=True, exist_ok=True)
        return str(p)

    def keep(self, *paths: str) -> None:
        """Snapshot files (or every file under folders) that must be unchanged afterwards."""
        for p in map(Path, paths):
            for f in [p] if not p.is_dir() else [q for q in p.rglob("*") if q.is_file()]:
                self.kept[f] = f.read_bytes() if f.exists() else None

    def model_copy(self, name: str = "m") -> Path:
        import shutil

        return Path(shutil.copytree(self.model_dir, self.tmp / name))

    def config(self, **sections: Any) -> str:
        return str(write_config(self.tmp / "cfg.yaml", self.tmp / "run", **sections))

    def tokens(self, name: str = "t.safetensors", n: int = 1) -> str:
        images = [self.image(f"tok_in/{i}.png", seed=i) for i in range(n)]
        out = self.path(name)
        assert main(["encode", *images, "--model", self.model, "--out", out, "--quiet"]) == 0
        return out


@dataclass
class Case:
    id: str
    setup: Callable[[W], list[str] | Callable[[], Any]]  # CLI argv, or an API call that must raise
    code: int | None  # CLI exit code; None for API cases
    message: str  # what the one line (stderr / the exception) must contain
    check: Callable[[W], None] | None = None  # extra assertions on the files afterwards


def _model_with_config(w: W, config: Any) -> str:
    d = w.model_copy()
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def _model_with_bad_type(w: W) -> str:
    cfg = json.loads((w.model_dir / "config.json").read_text())
    cfg["vision"]["width"] = "wide"
    return _model_with_config(w, cfg)


def _truncated(w: W, keep_bytes: int | None) -> str:
    d = w.model_copy()
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if keep_bytes is None else data[:keep_bytes])
    return str(d)


def _bad_token_metadata(w: W) -> str:
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = w.tokens()
    with safe_open(src, framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    meta["grid"] = "four"
    bad = w.path("bad.safetensors")
    save_file(tensors, bad, metadata=meta)
    return bad


def _train(w: W, *overrides: str, **sections: Any) -> list[str]:
    return ["train", w.config(**sections), *overrides]


def _corrupt_folder(w: W, n: int) -> str:
    for i in range(n):
        w.file(f"bad/cls/{i:03d}.png", b"not a png")
    return w.path("bad")


def _resume_other_model(w: W) -> list[str]:
    from qlip.train.config import load_config

    w.folder("run/checkpoints")
    w.file("run/checkpoints/step_00000001.pt", b"a checkpoint of another model")
    other = load_config(w.config(model={"name": "qlip-shapes-s"}))
    other.save(w.tmp / "run" / "config.yaml")
    w.keep(w.path("run"))
    return _train(w)


def _resume_other_weights(w: W) -> list[str]:
    """A run folder without its config.yaml, holding a checkpoint of another model."""
    w.folder("run/checkpoints")
    torch.save({"step": 1, "world_size": 1, "model": {"other.weight": torch.zeros(2)}},
               w.tmp / "run" / "checkpoints" / "step_00000001.pt")  # fmt: skip
    w.keep(w.path("run/checkpoints"))
    return _train(w)


def _save_pretrained_onto_file(w: W) -> Callable[[], Any]:
    target = w.file("weights.bin", b"precious")
    w.keep(target)
    model = create_model(w.model)
    return lambda: model.save_pretrained(target)


def _decode_counts(w: W) -> None:
    out = w.tmp / "dec"
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png"]


def _save_inputs_distinct(w: W) -> None:
    out = w.tmp / "rec"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == ["inputs/x.png", "inputs/x_input.png", "x.png", "x_input.png"]


def _no_leftovers(w: W) -> None:
    assert sorted(p.name for p in (w.tmp / "out").iterdir()) == []


def _shards_kept(w: W) -> None:
    assert not list((w.tmp / "shards").glob("*.tmp*"))


def _shards_twice(w: W) -> list[str]:
    argv = ["data", "write-shards", "shapes", "--count", "2", "--out", w.path("s"), "--quiet"]
    assert main(argv) == 0
    w.keep(w.path("s"))
    return argv


def _folder_source(w: W) -> str:
    w.image("src/cls/a.png")
    w.keep(w.path("src"))
    return w.path("src")


def _classify_without_tokenizer(w: W) -> list[str]:
    d = w.model_copy()
    (d / "vocab.json").unlink()
    return ["classify", w.image(), "--model", str(d), "--labels", "a,b"]


def _encode_onto_input(w: W) -> list[str]:
    x = w.image()
    w.keep(x)
    return ["encode", x, "--model", w.model, "--out", x, "--overwrite"]


def _reconstruct_into_inputs(w: W) -> list[str]:
    w.image("imgs/a.png")
    w.image("imgs/b.png", seed=1)
    w.keep(w.path("imgs"))
    return ["reconstruct", w.path("imgs"), "--model", w.model, "--out", w.path("imgs"), "--overwrite", "--quiet"]


def _save_inputs(w: W) -> list[str]:
    w.image("in/x.png")
    w.image("in/x_input.png", seed=1)
    w.keep(w.path("in"))
    return ["reconstruct", w.path("in"), "--model", w.model, "--out", w.path("rec"), "--save-inputs", "--quiet"]


def _header_only_csv(w: W) -> list[str]:
    return _train(w, data={"train": w.file("pairs.csv", "image,caption\n"), "tokenizer": str(w.model_dir)})


def _run_dir_is_file(w: W) -> list[str]:
    w.file("run", "my notes")
    w.keep(w.path("run"))
    return _train(w)


def _zero_shot_template(w: W) -> list[str]:
    templates = w.file("templates.txt", "a photo of a {x} {}.\n")
    return ["eval", "zero-shot", "--model", w.model, "--data", "shapes:easy", "--limit", "4", "--templates",
            templates, "--out", w.path("rep"), "--device", "cpu"]  # fmt: skip


CASES = [
    # --- batch sizes, counts ---------------------------------------------------------------------------------------
    *[Case(f"{cmd}-batch-size-{n}", lambda w, cmd=cmd, n=n: [cmd, w.image() if cmd != "decode" else w.tokens(),
                                                             "--model", w.model, "--out", w.path("o"),
                                                             "--batch-size", n], 2, "--batch-size")
      for cmd in ("encode", "decode", "reconstruct") for n in ("0", "-1")],  # fmt: skip
    *[Case(f"classify-batch-size-{n}", lambda w, n=n: ["classify", w.image(), "--model", w.model, "--labels", "a,b",
                                                      "--batch-size", n], 2, "--batch-size") for n in ("0", "-1")],
    Case("classify-top-0", lambda w: ["classify", w.image(), "--model", w.model, "--labels", "a,b", "--top", "0"],
         2, "--top"),
    Case("tokenize-batch-size-0", lambda w: ["tokenize", "--model", w.model, "--data", "shapes", "--out",
                                             w.path("o"), "--batch-size", "0"], 2, "--batch-size"),
    Case("write-shards-count-negative", lambda w: ["data", "write-shards", "shapes", "--count", "-5", "--out",
                                                   w.path("s")], 2, "--count"),
    Case("write-shards-shard-size-0", lambda w: ["data", "write-shards", "shapes", "--count", "4", "--out",
                                                 w.path("s"), "--shard-size", "0"], 2, "--shard-size"),
    Case("preview-n-0", lambda w: ["data", "preview", "--n", "0", "--out", w.path("p.png")], 2, "--n"),
    Case("preview-cols-0", lambda w: ["data", "preview", "--cols", "0", "--out", w.path("p.png")], 2, "--cols"),
    Case("eval-batch-size-0", lambda w: ["eval", "recon", "--model", w.model, "--data", "shapes", "--batch-size",
                                         "0", "--out", w.path("rep")], 2, "--batch-size"),
    Case("eval-limit-0", lambda w: ["eval", "recon", "--model", w.model, "--data", "shapes", "--limit", "0",
                                    "--out", w.path("rep")], 2, "--limit"),
    # --- devices ---------------------------------------------------------------------------------------------------
    Case("encode-device-meta", lambda w: ["encode", w.image(), "--model", w.model, "--out", w.path("t.st"),
                                          "--device", "meta"], 2, "--device meta"),
    Case("tokenize-device-meta", lambda w: ["tokenize", "--model", w.model, "--data", "shapes", "--limit", "4",
                                            "--out", w.path("o"), "--device", "meta"], 2, "--device meta"),
    Case("eval-device-meta", lambda w: ["eval", "recon", "--model", w.model, "--data", "shapes", "--limit", "4",
                                        "--out", w.path("rep"), "--device", "meta"], 2, "--device meta"),
    # --- classify templates ----------------------------------------------------------------------------------------
    Case("classify-template-unknown-field", lambda w: ["classify", w.image(), "--model", w.model, "--labels", "a,b",
                                                       "--template", "a {x} of {}"], 2, "--template"),
    Case("classify-template-lone-brace", lambda w: ["classify", w.image(), "--model", w.model, "--labels", "a,b",
                                                    "--template", "a { of {}"], 2, "--template"),
    Case("classify-template-no-slot", lambda w: ["classify", w.image(), "--model", w.model, "--labels", "a,b",
                                                 "--template", "a photo"], 2, "--template"),
    Case("eval-zero-shot-template-unknown-field", _zero_shot_template, 2, "{x}"),
    # --- --out -----------------------------------------------------------------------------------------------------
    Case("encode-out-is-dir", lambda w: ["encode", w.image(), "--model", w.model, "--out", w.folder("d")], 2,
         "is a folder"),
    Case("encode-out-under-file", lambda w: ["encode", w.image(), "--model", w.model, "--out",
                                             w.file("f") + "/t.safetensors"], 2, "is a file"),
    Case("encode-out-empty", lambda w: ["encode", w.image(), "--model", w.model, "--out", ""], 2, "empty"),
    Case("encode-unreadable-leaves-nothing", lambda w: ["encode", w.file("a.png", b"junk"), "--model", w.model,
                                                        "--out", w.folder("out") + "/t.safetensors"], 1, "a.png",
         _no_leftovers),  # fmt: skip
    Case("decode-out-under-file", lambda w: ["decode", w.tokens(), "--model", w.model, "--out", w.file("f") + "/d"],
         2, "is a file"),
    Case("decode-out-is-file", lambda w: ["decode", w.tokens(), "--model", w.model, "--out", w.file("f")], 2,
         "is a file"),
    Case("reconstruct-out-empty", lambda w: ["reconstruct", w.image(), "--model", w.model, "--out", ""], 2, "empty"),
    Case("eval-out-is-file", lambda w: ["eval", "recon", "--model", w.model, "--data", "shapes", "--limit", "4",
                                        "--out", w.file("rep")], 2, "is a file"),
    Case("preview-out-is-dir", lambda w: ["data", "preview", "--n", "2", "--out", w.folder("d")], 2, "is a folder"),
    Case("write-shards-out-is-file", lambda w: ["data", "write-shards", "shapes", "--count", "4", "--out",
                                                w.file("s")], 2, "is a file"),
    Case("tokenize-out-is-file", lambda w: ["tokenize", "--model", w.model, "--data", "shapes", "--limit", "4",
                                            "--out", w.file("o")], 2, "is a file"),
    Case("tokenizer-train-out-is-file", lambda w: ["tokenizer", "train", w.file("c.txt", "a red square\n" * 20),
                                                   "--vocab-size", "300", "--out", w.file("o")], 2, "is a file"),
    # --- model directories -----------------------------------------------------------------------------------------
    Case("model-truncated-safetensors", lambda w: ["encode", w.image(), "--model", _truncated(w, None), "--out",
                                                   w.path("t.st")], 2, "model.safetensors"),
    Case("model-empty-safetensors", lambda w: ["encode", w.image(), "--model", _truncated(w, 0), "--out",
                                               w.path("t.st")], 2, "model.safetensors"),
    Case("model-config-wrong-type", lambda w: ["encode", w.image(), "--model", _model_with_bad_type(w), "--out",
                                               w.path("t.st")], 2, "config.json"),
    Case("model-config-json-list", lambda w: ["encode", w.image(), "--model", _model_with_config(w, [1, 2]),
                                              "--out", w.path("t.st")], 2, "config.json"),
    Case("api-create-model-config-wrong-type", lambda w: lambda: create_model(_model_with_bad_type(w)), None,
         "config.json"),
    Case("api-create-model-config-json-list", lambda w: lambda: create_model(_model_with_config(w, [1])), None,
         "config.json"),
    Case("api-create-model-truncated", lambda w: lambda: create_model(_truncated(w, None)), None,
         "model.safetensors"),
    Case("model-missing", lambda w: ["encode", w.image(), "--model", w.path("nowhere"), "--out", w.path("t.st")], 2,
         "nowhere"),
    Case("decode-token-metadata", lambda w: ["decode", _bad_token_metadata(w), "--model", w.model, "--out",
                                             w.path("d")], 2, "bad.safetensors"),
    Case("decode-not-a-token-file", lambda w: ["decode", w.file("t.safetensors", b"junk"), "--model", w.model,
                                               "--out", w.path("d")], 2, "t.safetensors"),
    # --- training start-up -----------------------------------------------------------------------------------------
    Case("train-lr-negative", lambda w: _train(w, "optim.lr=-1e-3"), 2, "optim.lr"),
    Case("train-lr-nan", lambda w: _train(w, "optim.lr=.nan"), 2, "optim.lr"),
    Case("train-lr-zero", lambda w: _train(w, "optim.lr=0"), 2, "optim.lr"),
    Case("train-betas-out-of-range", lambda w: _train(w, "optim.betas=[0.9,1.5]"), 2, "optim.betas"),
    Case("train-unknown-model", lambda w: _train(w, "model.name=qlip-huge"), 2, "qlip-huge"),
    Case("train-missing-init", lambda w: _train(w, f"init={w.path('nowhere')}"), 2, "nowhere"),
    Case("train-threads-negative", lambda w: _train(w, "distributed.threads=-2"), 2, "distributed.threads"),
    Case("train-workers-negative", lambda w: _train(w, "data.num_workers=-1"), 2, "data.num_workers"),
    Case("train-max-bad-fraction", lambda w: _train(w, "data.max_bad_fraction=1.5"), 2, "data.max_bad_fraction"),
    Case("train-unknown-shapes-field", lambda w: _train(w, "data.shapes.colour=red"), 2, "colour"),
    Case("train-run-dir-is-file", _run_dir_is_file, 2, "run_dir"),
    Case("train-header-only-csv", _header_only_csv, 2, "pairs.csv"),
    Case("train-missing-tokenizer", lambda w: _train(w, f"data.tokenizer={w.path('tok')}"), 2, "data.tokenizer"),
    Case("train-resume-other-model", _resume_other_model, 2, "qlip-shapes-s"),
    Case("train-resume-other-weights", _resume_other_weights, 2, "step_00000001.pt"),
    Case("train-unknown-key", lambda w: _train(w, "optim.learning_rate=1"), 2, "optim.learning_rate"),
    Case("train-eval-num-samples-0", lambda w: _train(w, "eval.num_samples=0", "eval.at_end=true"), 2,
         "eval.num_samples"),
    Case("train-weight-decay-negative", lambda w: _train(w, "optim.weight_decay=-0.1"), 2, "optim.weight_decay"),
    Case("train-missing-data", lambda w: _train(w, f"data.train={w.path('nodata')}"), 2, "nodata"),
    Case("train-config-missing", lambda w: ["train", w.path("nope.yaml")], 2, "nope.yaml"),
    Case("balance-lr-negative", lambda w: ["balance", w.config(), "optim.lr=-1"], 2, "optim.lr"),
    *([] if CUDA else [Case("train-device-cuda-without-gpu", lambda w: _train(w, "distributed.device=cuda"), 2,
                            "distributed.device=cuda")]),  # fmt: skip
    # --- data ------------------------------------------------------------------------------------------------------
    Case("data-check-missing", lambda w: ["data", "check", w.path("nowhere")], 2, "nowhere"),
    Case("data-check-json-is-dir", lambda w: ["data", "check", "shapes", "--count", "2", "--json", w.folder("j")],
         2, "--json"),
    Case("data-check-header-only-csv", lambda w: ["data", "check", w.file("pairs.csv", "image,caption\n")], 2,
         "pairs.csv"),
    Case("write-shards-bad-limit", lambda w: ["data", "write-shards", _corrupt_folder(w, 101), "--out",
                                              w.path("shards"), "--max-bad-fraction", "0.1", "--quiet"], 1, "000.png",
         _shards_kept),  # fmt: skip
    Case("write-shards-max-bad-fraction", lambda w: ["data", "write-shards", "shapes", "--count", "2", "--out",
                                                     w.path("s"), "--max-bad-fraction", "2"], 2,
         "--max-bad-fraction"),  # fmt: skip
    Case("tokenizer-train-on-png", lambda w: ["tokenizer", "train", w.image(), "--vocab-size", "600", "--out",
                                              w.path("tok")], 2, "x.png"),
    Case("tokenizer-train-missing", lambda w: ["tokenizer", "train", w.path("c.txt"), "--vocab-size", "600",
                                               "--out", w.path("tok")], 2, "c.txt"),
    # --- eval weights ----------------------------------------------------------------------------------------------
    Case("eval-inception-weights-missing", lambda w: ["eval", "recon", "--model", w.model, "--data", "shapes",
                                                      "--limit", "4", "--inception-weights", w.path("inc.pth"),
                                                      "--out", w.path("rep")], 2, "inc.pth"),  # fmt: skip
    Case("eval-lpips-weights-missing", lambda w: ["eval", "recon", "--model", w.model, "--data", "shapes",
                                                  "--limit", "4", "--lpips-weights", w.path("lp"), "--out",
                                                  w.path("rep")], 2, "lp"),  # fmt: skip
    # --- nothing lost ----------------------------------------------------------------------------------------------
    Case("encode-out-is-input", _encode_onto_input, 2, "input"),
    Case("reconstruct-out-is-input-folder", _reconstruct_into_inputs, 2, "input"),
    Case("reconstruct-save-inputs-names", _save_inputs, 0, "", _save_inputs_distinct),
    Case("decode-reports-what-it-wrote", lambda w: ["decode", w.tokens(n=2), "--model", w.model, "--out",
                                                    w.path("dec")], 0, "", _decode_counts),
    Case("api-save-pretrained-onto-file", _save_pretrained_onto_file, None, "weights.bin"),
    Case("write-shards-over-existing-shards", _shards_twice, 2, "already holds shards"),
    Case("write-shards-out-is-source", lambda w: ["data", "write-shards", _folder_source(w), "--out", w.path("src")],
         2, "input folder"),
    # --- found beyond the list -------------------------------------------------------------------------------------
    Case("encode-missing-image", lambda w: ["encode", w.path("gone.png"), "--model", w.model, "--out",
                                            w.path("t.st")], 2, "gone.png"),
    Case("decode-missing-tokens", lambda w: ["decode", w.path("gone.safetensors"), "--model", w.model, "--out",
                                             w.path("d")], 2, "gone.safetensors"),
    Case("classify-one-label", lambda w: ["classify", w.image(), "--model", w.model, "--labels", "dog"], 2,
         "--labels"),
    Case("classify-no-tokenizer", _classify_without_tokenizer, 2, "--tokenizer"),
    Case("tokenizer-vocab-size-0", lambda w: ["tokenizer", "train", w.file("c.txt", "a red square\n"),
                                              "--vocab-size", "0", "--out", w.path("tok")], 2, "--vocab-size"),
    Case("tokenize-workers-negative", lambda w: ["tokenize", "--model", w.model, "--data", "shapes", "--out",
                                                 w.path("o"), "--workers", "-1"], 2, "--workers"),
    Case("eval-workers-negative", lambda w: ["eval", "recon", "--model", w.model, "--data", "shapes", "--workers",
                                             "-1", "--out", w.path("rep")], 2, "--workers"),
    Case("eval-data-missing", lambda w: ["eval", "recon", "--model", w.model, "--data", w.path("nowhere"),
                                         "--out", w.path("rep"), "--device", "cpu"], 2, "nowhere"),
    Case("experiment-threads-negative", lambda w: ["experiment", "balance-sweep", "--config", w.config(), "--out",
                                                   w.path("x"), "--threads", "-1"], 2, "--threads"),
    Case("data-check-count-0", lambda w: ["data", "check", "shapes", "--count", "0"], 2, "--count"),
    Case("write-shards-image-size-8", lambda w: ["data", "write-shards", "shapes", "--count", "2", "--image-size",
                                                 "8", "--out", w.path("s")], 2, "image_size"),
    Case("preview-not-shapes", lambda w: ["data", "preview", w.folder("imgs"), "--out", w.path("p.png")], 2,
         "shapes"),
    Case("train-override-not-key-value", lambda w: _train(w, "optim.lr"), 2, "optim.lr"),
    Case("train-config-is-a-list", lambda w: ["train", w.file("list.yaml", "- 1\n- 2\n")], 2, "list.yaml"),
    Case("train-init-is-file", lambda w: _train(w, f"init={w.file('init.bin', b'x')}"), 2, "init.bin"),
    Case("train-lr-visual-inf", lambda w: _train(w, "optim.lr_visual=.inf"), 2, "optim.lr_visual"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_mistake(case: Case, tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    w = W(tmp_path, tiny_dir)
    what = case.setup(w)
    capsys.readouterr()
    if case.code is None:
        with pytest.raises(Exception) as info:
            what()
        assert isinstance(info.value, (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)), \
            repr(info.value)
        text = str(info.value)
        assert case.message in text and "\n" not in text.strip(), text
    else:
        try:
            code = main(what)
        except SystemExit as e:  # argparse
            code = e.code
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        assert code == case.code, err
        if case.code:
            lines = [ln for ln in err.splitlines() if ln.startswith("error")]
            assert lines, err
            assert case.message in err, err
    for path, data in w.kept.items():
        assert (path.read_bytes() if path.exists() else None) == data, f"{path} was changed"
    if case.check:
        case.check(w)



def test_training_log_names_the_bad_file(caplog):
    """A bad sample counted from a collated batch (as the trainer does) is logged by its file name, not '?'."""
    from qlip.data import BadSampleCounter, bad_marker
    from qlip.data.loader import SampleCollator
    from qlip.transforms import image_transform

    good = {"key": "ok.png", "image": Image.new("RGB", (32, 32)), "caption": "a square"}
    batch = SampleCollator(image_transform(32, train=False))([good, bad_marker("cats/broken.jpg", "corrupt", "eof")])
    counter = BadSampleCounter(max_bad_fraction=1.0, name="folder")
    with caplog.at_level("WARNING", logger="qlip"):
        counter.update(batch)
    assert "cats/broken.jpg" in caplog.text and counter.counts == {"corrupt": 1} and counter.seen == 2


def test_library_errors_reach_the_user_as_one_line(monkeypatch, capsys):
    """The safety net in main: qlip's own error types become one line (2, or 1 for bad data); a bug keeps its
    traceback."""
    import qlip.cli.tokenizer as group
    from qlip.data import BadDataError
    from qlip.tokenfile import TokenFileError

    argv = ["tokenizer", "train", "c.txt", "--vocab-size", "300", "--out", "tok"]
    for raised, code in ((TokenFileError("t.safetensors: not a token file"), 2), (BadDataError("x.png is bad"), 1)):
        monkeypatch.setattr(group, "cmd_tokenizer_train", lambda args, e=raised: (_ for _ in ()).throw(e))
        assert main(argv) == code
        err = capsys.readouterr().err
        assert err == f"error: {raised}\n"
    monkeypatch.setattr(group, "cmd_tokenizer_train", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(argv)


@pytest.mark.parametrize("command", ["write-shards", "check"])
def test_data_commands_show_progress_unless_quiet(command, tmp_path, capsys, monkeypatch):
    import qlip.progress

    monkeypatch.setattr(qlip.progress, "is_terminal", lambda stream: True)  # as on a person's terminal

    def run(*extra: str) -> str:
        out = ["--out", str(tmp_path / f"s{len(extra)}")] if command == "write-shards" else []
        assert main(["data", command, "shapes", "--count", "3", "--image-size", "32", *out, *extra]) == 0
        return capsys.readouterr().err

    assert "/3 [" in run()  # the bar, with the total it counts to
    assert run("--quiet") == ""


def test_interrupted_encode_leaves_no_temporary_file(tiny_dir, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    x = W(tmp_path, tiny_dir).image("in/x.png")
    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    assert main(["encode", x, "--model", str(tiny_dir), "--out", str(tmp_path / "out" / "t.safetensors")]) == 130
    assert list((tmp_path / "out").iterdir()) == []
