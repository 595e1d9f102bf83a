"""Experiments: variants reach the trainer with the intended weights, jobs resume-skip, peak memory is per
process, tables aggregate seeds, the Pareto front and the done-means criterion are right, and the results page is
generated from the tables. Training runs are qlip-tiny smoke runs (3 steps at 32 px)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from qlip.experiments import balance_modes, balance_sweep, recipes
from qlip.experiments.plots import pareto_front, ratio_positions
from qlip.experiments.report import write_results_page
from qlip.experiments.runner import Settings, Stage, Variant, run_variants
from qlip.experiments.tables import aggregate, cell, markdown_table, read_table, write_table
from qlip.train.build import balance_config
from qlip.train.config import load_config
from qlip.train.logger import read_metrics

torch.set_num_threads(1)

CONFIG = {
    "model": {"name": "qlip-tiny"},
    "data": {"train": "shapes:easy", "batch_size": 8, "shapes": {"sizes": ["large"]}},
    "optim": {"steps": 100, "warmup_steps": 10, "lr": 1.0e-3},
    "loss": {"balance": {"mode": "fixed", "weights": {"align": 1.0, "recon": 30.0, "quant": 1.0, "commit": 1.0}}},
    "eval": {"tasks": ["shape", "color", "position", "size"]},
    "distributed": {"threads": 1},
}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "shapes-test.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def smoke(config_file: Path, out: Path, seeds=(0,), **kw) -> Settings:
    return Settings(config=str(config_file), out=out, seeds=list(seeds), smoke=True, isolate=False, **kw)


def _row(variant: str, seeds: dict[int, dict[str, float]], meta=None) -> list[dict]:
    return [{"variant": variant, "seed": s, "meta": meta or {}, "metrics": m, "stages": {}} for s, m in seeds.items()]


# ------------------------------------------------------------------------------------------------ pure functions


def test_aggregate_mean_std_over_seeds_and_cells():
    results = _row("a", {0: {"psnr": 20.0}, 1: {"psnr": 22.0}, 2: {"psnr": 24.0}}) + _row("b", {0: {"psnr": 18.0}})
    rows = aggregate(results, order=["b", "a"])
    assert [r["variant"] for r in rows] == ["b", "a"]
    a = rows[1]["metrics"]["psnr"]
    assert a["mean"] == pytest.approx(22.0) and a["std"] == pytest.approx(2.0) and a["n"] == 3
    assert cell(rows[1], "psnr", 2) == "22.00 ± 2.00"
    assert cell(rows[0], "psnr", 1) == "18.0"  # one seed: no spread shown
    assert cell(rows[0], "ssim") == "-"
    md = markdown_table(rows, [("PSNR", "psnr", 1)], [("v", lambda r: r["variant"])])
    assert md.splitlines()[0] == "| v | PSNR |" and "| a | 22.0 ± 2.0 |" in md


def test_table_json_roundtrip_keeps_non_finite(tmp_path):
    write_table({"x": float("inf"), "rows": [{"y": float("nan")}]}, tmp_path / "t.json")
    json.loads((tmp_path / "t.json").read_text())  # standard JSON
    back = read_table(tmp_path / "t.json")
    assert back["x"] == math.inf and math.isnan(back["rows"][0]["y"])


def test_pareto_front_keeps_only_non_dominated_points():
    pts = [(10.0, 90.0), (20.0, 80.0), (15.0, 70.0), (25.0, 10.0), (5.0, 50.0), (float("nan"), 99.0)]
    assert pareto_front(pts) == [0, 1, 3]  # (15,70) is beaten by (20,80); (5,50) by (10,90)


def test_ratio_positions_put_single_objective_runs_beyond_the_finite_ratios():
    pos, ticks, labels = ratio_positions([0.0, 1.0, 1000.0, math.inf])
    assert pos == [-1.0, 0.0, 3.0, 4.0]
    assert labels[0] == "1:0" and labels[-1] == "0:1" and "1:1000" in labels


def test_done_means_criterion():
    def rows(default_zs, default_psnr):
        res = _row("1:0", {0: {"zs/mean": 90.0, "psnr": 15.0}}) + _row("0:1", {0: {"zs/mean": 10.0, "psnr": 25.0}})
        return aggregate(res + _row("d", {0: {"zs/mean": default_zs, "psnr": default_psnr}}))

    ok = balance_sweep.done_means_check(rows(86.0, 24.2), "d")
    assert ok["passed"] and ok["zero_shot_gap"] == pytest.approx(4.0) and ok["psnr_gap"] == pytest.approx(0.8)
    assert not balance_sweep.done_means_check(rows(84.0, 24.5), "d")["passed"]  # 6 points off
    assert not balance_sweep.done_means_check(rows(89.0, 23.5), "d")["psnr_ok"]  # 1.5 dB off


# ------------------------------------------------------------------------------------------------ variants


def test_sweep_variants_carry_the_ratios_and_seed_policy(config_file, tmp_path):
    settings = smoke(config_file, tmp_path, seeds=(0, 1, 2))
    settings.freeze()
    variants, default = balance_sweep.build_variants(settings, settings.base_config())
    names = [v.name for v in variants]
    assert names[0] == "default" and default == "default"  # 1:30 is not on the paper's list: run as its own point
    assert names[1:-1] == [label for label, _, _ in balance_sweep.SWEEP_RATIOS]
    assert variants[-1].name == balance_sweep.PROBE_VARIANT and variants[-1].stages[0].kind == "probe"
    seeds = {v.name: v.seeds for v in variants}
    assert seeds["default"] == seeds["1:0"] == seeds["0:1"] == [0, 1, 2] and seeds["1:100"] == [0]
    for v in variants[1:-1]:  # the overrides give the trainer exactly a_a : a_r
        (stage,) = v.stages
        cfg = load_config(stage.files, stage.overrides)
        w = balance_config(cfg).weights
        assert balance_sweep.ratio_of(w["align"], w["recon"]) == v.meta["ratio"]
        assert w["quant"] == 1.0 and w["commit"] == 1.0 and cfg.optim.steps == 3


def test_sweep_marks_a_listed_config_ratio_as_default(tmp_path):
    path = tmp_path / "c.yaml"
    cfg = dict(CONFIG, loss={"balance": {"mode": "fixed", "weights": {"align": 1.0, "recon": 1000.0, "quant": 1.0,
                                                                       "commit": 1.0}}})
    path.write_text(yaml.safe_dump(cfg))
    settings = smoke(path, tmp_path / "out", seeds=(0, 1, 2))
    variants, default = balance_sweep.build_variants(settings, settings.base_config())
    assert default == "1:1000" and "default" not in [v.name for v in variants]
    assert next(v for v in variants if v.name == "1:1000").seeds == [0, 1, 2]


def test_sweep_and_mode_variants_weigh_every_term_of_a_config_without_weights(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(dict(CONFIG, loss={})))  # the stage-1 default weights 1 : 1000 : 1 : 1
    settings = smoke(path, tmp_path / "out")
    sweep, _ = balance_sweep.build_variants(settings, settings.base_config())
    modes = balance_modes.build_variants(settings, 100, 0.1)
    stages = [v.stages[0] for v in sweep if v.name == "1:10"] + [v.stages[-1] for v in modes if v.name != "posthoc"]
    assert len(stages) == 4
    for stage in stages:
        w = balance_config(load_config(stage.files, stage.overrides)).weights
        assert w["quant"] == 1.0 and w["commit"] == 1.0 and w["align"] == 1.0  # nothing dropped


def test_mode_variants(config_file, tmp_path):
    settings = smoke(config_file, tmp_path)
    variants = {v.name: v for v in balance_modes.build_variants(settings, 100, 0.1)}
    assert list(variants) == list(balance_modes.MODES)
    modes = {n: balance_config(load_config(v.stages[-1].files, v.stages[-1].overrides)).mode
             for n, v in variants.items() if n != "posthoc"}  # fmt: skip
    assert modes == {"fixed": "fixed", "inverse-loss": "inverse-loss", "grad-norm": "grad-norm"}
    grad = variants["grad-norm"].stages[0]
    online = balance_config(load_config(grad.files, grad.overrides))
    assert online.warmup_steps == 10 and online.weights["recon"] == 1.0  # warm-up shortened to a tenth of the run
    probe, train = variants["posthoc"].stages
    assert probe.kind == "probe" and train.fragment_from_previous


def test_stage2_config_is_found_beside_the_stage1_config(tmp_path):
    (tmp_path / "a.yaml").write_text("{}")
    assert recipes.default_stage2_config(str(tmp_path / "a.yaml")) is None
    (tmp_path / "a-stage2.yaml").write_text("{}")
    assert recipes.default_stage2_config(str(tmp_path / "a.yaml")) == str(tmp_path / "a-stage2.yaml")


def test_recipes_scale_stage2_schedule_and_gan_start_with_the_budget(config_file, tmp_path):
    stage2 = tmp_path / "s2.yaml"
    stage2.write_text(yaml.safe_dump({"stage": 2, "data": CONFIG["data"], "optim": {"steps": 400, "warmup_steps": 40},
                                      "loss": {"lpips_weight": 0.0, "gan_start": 200}}))  # fmt: skip
    settings = Settings(config=str(config_file), out=tmp_path / "out", seeds=[0], budget=0.1, isolate=False)
    variants, info = recipes.build_variants(settings, str(stage2))
    assert info["stage1_steps"] == 10 and info["stage2_steps"] == 40 and info["stage2_gan_start"] == 20
    two = next(v for v in variants if v.name == "two-stage")
    cfg2 = load_config(two.stages[1].files, two.stages[1].overrides)
    assert cfg2.stage == 2 and cfg2.optim.steps == 40 and cfg2.loss.gan_start == 20 and cfg2.optim.warmup_steps == 4
    one = next(v for v in variants if v.name == "one-stage")
    assert load_config(one.stages[0].files, one.stages[0].overrides).optim.steps == 50


# ------------------------------------------------------------------------------------------------ running


def test_weights_reach_the_trainer_and_finished_jobs_are_skipped(config_file, tmp_path, monkeypatch):
    settings = smoke(config_file, tmp_path)
    variants, _ = balance_sweep.build_variants(settings, settings.base_config())
    one = next(v for v in variants if v.name == "1:100")
    (result,) = run_variants(settings, [one])
    run_dir = tmp_path / "runs" / "1:100" / "seed0" / "stage1"
    records = read_metrics(run_dir)
    assert records and all(r["w/align"] == 1.0 and r["w/recon"] == 100.0 for r in records)
    assert result["stages"]["stage1"]["steps"] == 3 and result["peak_rss_mb"] is None  # in-process: not per variant
    for key in ("zs/shape", "zs/color", "zs/position", "zs/mean", "lp/mean", "psnr", "ssim", "code_entropy"):
        assert math.isfinite(result["metrics"][key]), key
    assert "zs/size" not in result["metrics"]  # one size class in this config: trivially 100%, left out

    def fail(*a, **k):
        raise AssertionError("a finished job must not run again")

    monkeypatch.setattr("qlip.experiments.worker.execute_job", fail)
    (again,) = run_variants(settings, [one])
    assert again == result


def test_isolated_job_measures_its_own_peak_memory(config_file, tmp_path):
    settings = Settings(config=str(config_file), out=tmp_path, seeds=[0], smoke=True, isolate=True)
    settings.freeze()
    stage = Stage("stage1", files=[settings.config], overrides=["optim.steps=2", "optim.warmup_steps=0",
                  "eval.at_end=false", "logging.progress=false", "logging.tensorboard=false",
                  "data.shapes_training.bpe_captions=120", "data.shapes_training.bpe_vocab_size=600",
                  "data.shapes.image_size=32", "data.batch_size=4"], steps=2)  # fmt: skip
    (result,) = run_variants(settings, [Variant("v", [stage], [0])])
    assert 50 < result["peak_rss_mb"] < 8000 and result["stages"]["stage1"]["peak_rss_mb"] == result["peak_rss_mb"]
    assert (tmp_path / "runs" / "v" / "seed0" / "worker.log").is_file()


def test_a_variant_names_its_evaluator_and_overrides_the_shared_options(config_file, tmp_path, monkeypatch):
    from qlip.experiments import worker
    from qlip.experiments.runner import job_spec

    seen = []
    monkeypatch.setitem(worker.EVALUATORS, "probe-me",
                        lambda d, cfg, ev, opts, seed: seen.append((d, cfg, opts, seed)) or {"x": 1.0})  # fmt: skip
    settings = Settings(config=str(config_file), out=tmp_path, eval_options={"judge": "J", "data": "D"})
    variant = Variant("v", [], [0], evaluator="probe-me", eval_options={"judge": None})
    spec = job_spec(settings, variant, 0)
    assert spec["evaluator"] == "probe-me" and spec["eval_options"] == {"judge": None, "data": "D"}
    trained = [({"name": "a", "evaluate": True}, "CFG", tmp_path / "a"), ({"name": "b", "evaluate": False}, "X",
               tmp_path / "b")]  # fmt: skip
    metrics = worker._evaluate_models(trained, spec["eval"], 5, spec["evaluator"], spec["eval_options"])
    assert metrics == {"a/x": 1.0, "x": 1.0}  # the marked stage (prefixed) and the last one
    assert [d for d, *_ in seen] == [tmp_path / "a" / "last", tmp_path / "b" / "last"]
    assert all(cfg == "CFG" and opts == {"judge": None, "data": "D"} and s == 5 for _, cfg, opts, s in seen)
    with pytest.raises(ValueError, match="unknown evaluator 'nope'"):
        worker._evaluate_models(trained, spec["eval"], 0, "nope")


@pytest.mark.slow  # another Python + torch start-up (~5 s) for an error path
def test_failed_isolated_job_reports_its_log(config_file, tmp_path):
    settings = Settings(config=str(config_file), out=tmp_path, seeds=[0], smoke=True, isolate=True)
    bad = Stage("stage1", files=[str(config_file)], overrides=["optim.no_such_key=1"], steps=1)
    with pytest.raises(RuntimeError, match="no_such_key"):
        run_variants(settings, [Variant("bad", [bad], [0])])


@pytest.fixture(scope="module")
def recipes_out(config_file, tmp_path_factory):
    """`qlip experiment recipes --smoke` through the real CLI."""
    import qlip.cli as qcli

    out = tmp_path_factory.mktemp("exp") / "recipes"
    code = qcli.main(["experiment", "recipes", "--config", str(config_file), "--out", str(out), "--smoke",
                      "--seeds", "0", "--in-process"])  # fmt: skip
    assert code == 0
    return out


def test_recipes_table_has_each_recipe_and_the_stage_effect(recipes_out):
    table = read_table(recipes_out / "table.json")
    rows = {r["variant"]: r for r in table["rows"]}
    assert list(rows) == ["two-stage", "quantizer-after", "one-stage"]
    for name in ("two-stage", "quantizer-after"):
        assert {"stage1/psnr", "psnr", "stage2/time_s", "stage1/time_s"} <= set(rows[name]["metrics"])
    assert "stage2/time_s" not in rows["one-stage"]["metrics"]
    assert rows["one-stage"]["metrics"]["stage1/steps"]["mean"] == 4  # stage-1 steps + the (derived) stage-2 steps
    s2 = yaml.safe_load((recipes_out / "runs" / "two-stage" / "seed0" / "stage2" / "config.yaml").read_text())
    assert s2["stage"] == 2 and s2["init"].endswith("stage1/last")
    s1 = yaml.safe_load((recipes_out / "runs" / "quantizer-after" / "seed0" / "stage1" / "config.yaml").read_text())
    assert s1["model"]["bypass_quantizer"] is True
    assert (recipes_out / "recipes_quality.png").stat().st_size > 1000 and (recipes_out / "table.md").is_file()


def test_results_page_from_tables(recipes_out, tmp_path):
    results = recipes_out.parent
    sweep = aggregate(
        _row("1:0", {0: {"zs/mean": 60.0, "psnr": 15.0}, 1: {"zs/mean": 62.0, "psnr": 15.2}}, {"ratio": 0.0})
        + _row("1:1000", {0: {"zs/mean": 58.0, "psnr": 22.0}}, {"ratio": 1000.0, "label": "1:1000"})
        + _row("0:1", {0: {"zs/mean": 12.0, "psnr": 23.0}, 1: {"zs/mean": 14.0, "psnr": 23.4}}, {"ratio": math.inf})
    )
    settings = {"config": "c.yaml", "seeds": [0, 1], "budget": 0.05, "smoke": False, "model": "m", "batch_size": 8,
                "config_steps": 100, "stage1_steps": 5, "eval": {"num_eval": 10}, "chance": {"shape": 12.5}}
    write_table({"experiment": "balance-sweep", "settings": settings, "rows": sweep, "posthoc_ratio": 3.0,
                 "done_means": balance_sweep.done_means_check(sweep, "1:1000"), "figures": {}},
                results / "balance" / "table.json")  # fmt: skip
    page = write_results_page(results, tmp_path / "docs" / "results.md", assets=tmp_path / "docs" / "results")
    text = page.read_text()
    assert "REDUCED BUDGET" in text and "SMOKE RUN" in text  # each section says how it was run
    assert "| 1:1000 | 74.3 | 35.3 | 24.5 |" in text  # the paper's Table 3a beside ours
    assert "Default-ratio criterion (NOT MET)" in text  # 1:1000: 3 points below best zero-shot, 1.2 dB below PSNR
    assert "PSNR gap of the default to 0:1: +1.20 dB" in text  # the page says why, with the numbers
    assert "meet both conditions themselves: none" in text
    assert "+48.00 pts (clear" in text  # 1:0 vs 0:1 zero-shot, spread 1.41 over two seeds
    assert "1:3" in text and "shape 12.5%" in text
    assert (tmp_path / "docs" / "results" / "recipes_quality.png").is_file()
    assert "](results/recipes_quality.png)" in text
    assert (tmp_path / "docs" / "results" / "balance.json").is_file()


def test_cli_user_errors_exit_2(config_file, tmp_path, capsys):
    import qlip.cli as qcli

    base = ["experiment", "balance-sweep", "--config", str(config_file), "--out", str(tmp_path), "--smoke"]
    assert qcli.main([*base, "--seeds", "a,b"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert qcli.main(["experiment", "recipes", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)]) == 2
    report = ["experiment", "report", "--results", str(tmp_path / "empty"), "--doc", str(tmp_path / "r.md")]
    assert qcli.main(report) == 2
