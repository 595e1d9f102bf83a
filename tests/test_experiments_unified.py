"""The unified model's comparisons (`qlip experiment um3-schedule | um3-specialists`) end to end on tiny models with
--smoke: every run trains for the same steps and batch, is scored by the machinery of `qlip eval unified` (or of
`qlip eval generation` for the generator), and lands in table.json / table.md; a rerun skips finished runs; user
mistakes are one error line."""

from __future__ import annotations

import json

import pytest
import yaml

from qlip.cli import main
from qlip_testing import make_tiny_lm_with_image_tokens, write_tiny_run_config

SPEC = "shapes:easy?holdout_combinations=0.1&eval_combinations=held_out&image_size=32"
WORDS = ("the module reads a file and writes the result.", "every object has a type and a value.",
         "a list holds items in order.", "the parser splits the text into words.")  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    """A 3-step language model, a QLIP tokenizer with its token folder, an untrained judge, and the two configs."""
    from qlip.data.shapes import ShapesConfig
    from qlip.eval.judge import JudgeConfig, ShapesJudge, save_judge

    root = tmp_path_factory.mktemp("um3-exp")
    make_tiny_lm_with_image_tokens(root, tiny_tokenizer, WORDS)
    easy = ShapesConfig.preset("easy")  # an untrained judge: the experiments' plumbing is tested, not its verdicts
    classes = {"shape": easy.shapes, "color": easy.colors, "position": easy.positions}
    save_judge(ShapesJudge(JudgeConfig(image_size=32, classes=classes)), root / "judge")
    um = {"init": str(root / "lm" / "last"), "tokenizer": str(root / "tok"), "tokens": str(root / "tokens"),
          "start": [3, 1, 1], "end": [1, 1, 1], "horizon": 100, "eval_windows": 4, "eval_images": 2}  # fmt: skip
    write_tiny_run_config(root, root / "um", "unified", um)
    gen = {"tokenizer": str(root / "aligned-unused"), "tokens": str(root / "unused"), "width": 32, "depth": 1,
           "heads": 2, "eval_prompts": 0}  # fmt: skip
    write_tiny_run_config(root, root / "t2i", "generator", gen)
    for name in ("um", "t2i"):  # longer than a smoke run: --smoke must cut every run to 3 steps
        cfg = yaml.safe_load((root / f"{name}.yaml").read_text())
        cfg["optim"]["steps"] = 100
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _eval(root, out):
    return ["--out", str(out), "--smoke", "--in-process", "--judge", str(root / "judge"), "--eval-data", SPEC,
            "--eval-images", "2"]


def test_schedule_on_and_off_at_equal_steps_and_batch(setup, tmp_path):
    out = tmp_path / "schedule"
    argv = ["experiment", "um3-schedule", "--config", str(setup / "um.yaml"), *_eval(setup, out)]
    assert main(argv) == 0
    table = json.loads((out / "table.json").read_text())
    rows = {r["variant"]: r for r in table["rows"]}
    assert list(rows) == ["on", "off"]
    for row in rows.values():
        m = row["metrics"]
        assert m["train/steps"]["mean"] == 3 and m["num_eval"]["mean"] == 2
        for key in ("text_ppl", "text_ppl_init", "text_ppl_change", "cap/shape", "cap/all", "gen/shape", "gen/all",
                    "params", "train/time_s", "train/img_per_s"):
            assert key in m, key  # peak memory is measured per run in its own process (not with --in-process)
    # "off" is the end ratios from the first step: fewer text rows than "on", the same total
    on, off = rows["on"]["meta"]["rows"], rows["off"]["meta"]["rows"]
    assert off["text"] < on["text"] and sum(on.values()) == pytest.approx(sum(off.values()), abs=0.2)
    assert off == {"text": 8, "image_to_text": 8, "text_to_image": 8}  # 3 steps x 8 rows at 1:1:1
    assert table["settings"]["horizon"] == 3  # 100 of the config's 100 steps: the whole (3-step) run
    settings = table["settings"]
    assert settings["steps"] == 3 and settings["batch_size"] == 8 and "processor" in settings["machine"]
    assert settings["evaluation"]["judge"] == str(setup / "judge") and settings["evaluation"]["top_p"] == 0.95
    md = (out / "table.md").read_text()
    assert "| schedule |" in md and "off: 1:1:1 from the first step" in md and "peak RSS MiB" in md
    for name, flag in (("on", True), ("off", False)):  # the trainer ran what the row says
        cfg = yaml.safe_load((out / "runs" / name / "seed0" / "train" / "config.yaml").read_text())
        assert cfg["unified"]["schedule"] is flag and cfg["optim"]["steps"] == 3
    # A rerun continues: finished runs are not trained again.
    stamp = (out / "runs" / "off" / "seed0" / "result.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "runs" / "off" / "seed0" / "result.json").stat().st_mtime_ns == stamp


def test_specialists_beside_the_unified_model_each_on_what_it_can_do(setup, tmp_path):
    out = tmp_path / "specialists"
    argv = ["experiment", "um3-specialists", "--unified-config", str(setup / "um.yaml"), "--t2i-config",
            str(setup / "t2i.yaml"), *_eval(setup, out)]  # fmt: skip
    assert main(argv) == 0
    table = json.loads((out / "table.json").read_text())
    rows = {r["variant"]: r["metrics"] for r in table["rows"]}
    assert list(rows) == ["unified", "text-only", "captioner", "generator"]
    text, caption, gen = ("text_ppl", "text_ppl_change"), ("cap/shape", "cap/all"), ("gen/shape", "gen/all")
    can = {"unified": text + caption + gen, "text-only": text, "captioner": text + caption, "generator": gen}
    for name, metrics in rows.items():
        assert metrics["train/steps"]["mean"] == 3
        for key in text + caption + gen:
            assert (key in metrics) == (key in can[name]), (name, key)
    for name in rows:  # equal budget: the same batch for every model
        cfg = yaml.safe_load((out / "runs" / name / "seed0" / "train" / "config.yaml").read_text())
        assert cfg["data"]["batch_size"] == 8 and cfg["optim"]["steps"] == 3
    gen_cfg = yaml.safe_load((out / "runs" / "generator" / "seed0" / "train" / "config.yaml").read_text())
    assert gen_cfg["generator"]["tokens"] == str(setup / "tokens")  # over the unified model's tokens
    ratios = yaml.safe_load((out / "runs" / "captioner" / "seed0" / "train" / "config.yaml").read_text())["unified"]
    assert ratios["end"] == [0, 1, 0] and ratios["schedule"] is False
    md = (out / "table.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| text-only LM")]
    cells = [c.strip() for c in lines[0].split("|")[1:-1]]
    assert cells[4:12] == ["-"] * 8 and cells[2] != "-"  # blank where it cannot: 4 captions + 4 generation
    assert "Equal budget: every model trains 3 optimizer steps x batch 8" in md


def test_user_mistakes_are_one_line(setup, tmp_path, capsys):
    schedule = ["experiment", "um3-schedule", "--smoke", "--in-process", "--judge", "none"]
    assert main([*schedule, "--config", str(setup / "t2i.yaml"), "--out", str(tmp_path / "a")]) == 2
    same = yaml.safe_load((setup / "um.yaml").read_text())
    same["unified"]["start"] = same["unified"]["end"]
    (tmp_path / "same.yaml").write_text(yaml.safe_dump(same))
    assert main([*schedule, "--config", str(tmp_path / "same.yaml"), "--out", str(tmp_path / "b")]) == 2
    assert main(["experiment", "um3-schedule", "--config", str(setup / "um.yaml"), "--out", str(tmp_path / "c"),
                 "--judge", str(tmp_path / "no-judge")]) == 2  # fmt: skip
    specialists = ["experiment", "um3-specialists", "--smoke", "--in-process", "--judge", "none"]
    assert main([*specialists, "--unified-config", str(setup / "um.yaml"), "--t2i-config", str(setup / "um.yaml"),
                 "--out", str(tmp_path / "d")]) == 2  # fmt: skip
    assert main([*specialists, "--unified-config", str(setup / "t2i.yaml"), "--t2i-config", str(setup / "t2i.yaml"),
                 "--out", str(tmp_path / "e")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 5 and len(err.strip().splitlines()) == 5
    assert err.count("task: unified") == 2 and "task: generator" in err and "start equals" in err
    assert "no judge directory" in err
    assert not (tmp_path / "c").exists()  # refused before anything was written
