"""Execute one (variant, seed) job: train its stages in order, record time and peak memory, evaluate.

``python -m qlip.experiments.worker JOB.json`` (what :func:`qlip.experiments.runner.run_job` starts) or
:func:`execute_job` in-process. Peak memory is ``getrusage(RUSAGE_SELF).ru_maxrss`` read after each stage's training
and before any evaluation, so in a fresh process it is the training peak of this variant (through that stage).
``result.json`` is written last and atomically: its presence marks the job as finished.
"""

from __future__ import annotations

import json
import logging
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ..fileio import write_text_atomic
from ..progress import setup_logging
from ..train.config import load_config
from ..train.logger import read_metrics

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _run_stats(run_dir: Path) -> dict[str, Any]:
    """Throughput and the last logged losses of a training run."""
    records = read_metrics(run_dir)
    out: dict[str, Any] = {}
    rates = [r["samples_per_s"] for r in records[1:] if isinstance(r.get("samples_per_s"), (int, float))]
    if rates:  # the first interval includes start-up (tokenizer, compile of kernels): left out
        out["img_per_s"] = statistics.median(rates)
    if records:
        for key, value in records[-1].items():
            if key.startswith(("loss/", "w/")) and isinstance(value, (int, float)):
                out[key] = float(value)
    return out


def _evaluate_qlip(model_dir: Path, cfg: Any, ev: dict[str, Any], options: dict[str, Any],
                   seed: int) -> dict[str, Any]:  # fmt: skip
    """A QLIP model's zero-shot, linear probe and reconstruction on the held-out images of ``cfg``'s data."""
    from .evaluate import evaluate_model

    return evaluate_model(model_dir, cfg.data, tasks=list(cfg.eval.tasks), num_eval=ev["num_eval"],
                          num_probe_train=ev["num_probe_train"], batch_size=ev["batch_size"], seed=seed)  # fmt: skip


def _evaluate_vlm(model_dir: Path, cfg: Any, ev: dict[str, Any], options: dict[str, Any],
                  seed: int) -> dict[str, Any]:  # fmt: skip
    """A VLM's shapes questions on held-out images (held-out triples when the data has some) and phrasings."""
    import dataclasses

    from ..data.loader import shapes_config_from_spec
    from ..understanding import load
    from ..understanding.evaluate import evaluate_shapes_vqa

    vlm = load(model_dir)
    shapes = shapes_config_from_spec(cfg.task_options.data, vlm.tower.image_size)
    if shapes.holdout_combinations:
        shapes = dataclasses.replace(shapes, eval_combinations="held_out")
    return evaluate_shapes_vqa(vlm, shapes, num_images=int(ev["num_eval"]), split="test", seed=seed,
                               batch_size=int(ev.get("batch_size", 64)), blind=False)["metrics"]  # fmt: skip


def evaluate_generator_run(generator_dir: Path, options: dict[str, Any], *, num_eval: int,
                           seed: int) -> dict[str, Any]:  # fmt: skip
    """ShapesEval (:func:`qlip.eval.generation.evaluate_generator`) of a generator directory, on the CPU, plus its
    trainable parameter count (``params``).

    ``options``: ``judge`` (a judge directory), ``data`` (the shapes spec whose captions are drawn), ``split``,
    ``cfg_scale``, ``temperature``, ``top_p`` and ``batch_size``; ``num_eval`` captions, sampled with ``seed``."""
    from ..data.loader import shapes_config_from_spec
    from ..eval.generation import evaluate_generator
    from ..eval.judge import load_judge
    from ..generation import load

    gen = load(generator_dir, device="cpu")
    result = evaluate_generator(gen, load_judge(options["judge"]), shapes_config_from_spec(options["data"]),
                                split=options.get("split", "test"), limit=num_eval,
                                batch_size=int(options.get("batch_size", 32)),
                                cfg_scale=float(options.get("cfg_scale", 3.0)),
                                temperature=float(options.get("temperature", 1.0)),
                                top_p=float(options.get("top_p", 1.0)), seed=seed)  # fmt: skip
    params = sum(p.numel() for p in gen.model.trainable_parameters())
    return {**result.metrics, "params": params}


def evaluate_unified_run(model_dir: Path, options: dict[str, Any], *, num_eval: int, seed: int) -> dict[str, Any]:
    """What ``qlip eval unified`` measures (:func:`qlip.unified.evaluate.evaluate_unified`) of a language-model or
    unified-model directory, on the CPU, plus its parameter count (``params``).

    ``options``: ``data`` (the shapes spec of the images captioned and the captions drawn; None: text only),
    ``judge`` (a judge directory; None or "none": no text->image), ``split``, ``cfg_scale``, ``temperature``,
    ``top_p`` and ``batch_size``; ``num_eval`` images and captions, sampled with ``seed``."""
    from ..data.loader import shapes_config_from_spec
    from ..unified import load
    from ..unified.evaluate import evaluate_unified

    um = load(model_dir, device="cpu")
    shapes = None
    if options.get("data") and um.is_unified:
        shapes = shapes_config_from_spec(options["data"], image_size=um.qlip.image_size)
    judge = None
    if shapes is not None and options.get("judge") not in (None, "none"):
        from ..eval.judge import load_judge

        judge = load_judge(options["judge"])
    result = evaluate_unified(um, shapes=shapes, judge=judge, limit=num_eval, split=options.get("split", "test"),
                              cfg_scale=float(options.get("cfg_scale", 3.0)),
                              temperature=float(options.get("temperature", 1.0)),
                              top_p=float(options.get("top_p", 0.95)), seed=seed,
                              batch_size=int(options.get("batch_size", 50)))  # fmt: skip
    for note in result["notes"]:
        log.warning("%s: %s", model_dir, note)
    return {**result["metrics"], "params": sum(p.numel() for p in um.lm.parameters())}


def _evaluate_generator(model_dir: Path, cfg: Any, ev: dict[str, Any], options: dict[str, Any],
                        seed: int) -> dict[str, Any]:  # fmt: skip
    return evaluate_generator_run(model_dir, options, num_eval=int(ev["num_eval"]), seed=seed)


def _evaluate_unified(model_dir: Path, cfg: Any, ev: dict[str, Any], options: dict[str, Any],
                      seed: int) -> dict[str, Any]:  # fmt: skip
    return evaluate_unified_run(model_dir, options, num_eval=int(ev["num_eval"]), seed=seed)


# A variant's ``evaluator`` -> fn(export dir, first stage's config, eval sizes, eval options, seed) -> flat metrics.
EVALUATORS = {"qlip": _evaluate_qlip, "vqa": _evaluate_vlm, "generator": _evaluate_generator,
              "unified": _evaluate_unified}  # fmt: skip


def execute_job(spec: dict[str, Any], *, isolated: bool = True) -> dict[str, Any]:
    """Train every stage of ``spec`` (see ``runner.job_spec``), evaluate, write and return ``result.json``.

    Args:
        spec: the job description.
        isolated: this process runs only this job (then the peak memory is meaningful; otherwise it is None).
    """
    from ..train.loop import train
    from ..train.probe import run_balance_probes

    directory = Path(spec["dir"])
    directory.mkdir(parents=True, exist_ok=True)
    seed = int(spec["seed"])
    result: dict[str, Any] = {"variant": spec["variant"], "seed": seed, "meta": spec.get("meta", {}), "stages": {}}
    previous: Path | None = None
    trained: list[tuple[dict[str, Any], Any, Path]] = []
    total_train_s = 0.0
    for stage in spec["stages"]:
        run_dir = directory / stage["name"]
        files = list(stage["files"])
        overrides = list(stage["overrides"]) + [f"seed={seed}", f"run_dir={run_dir}"]
        if stage["fragment_from_previous"]:
            if previous is None:
                raise ValueError(f"stage {stage['name']} takes balance.yaml from a previous stage, but is the first")
            files.append(str(previous / "balance.yaml"))
        if stage["init_from_previous"]:
            if previous is None:
                raise ValueError(f"stage {stage['name']} starts from a previous stage, but is the first")
            overrides.append(f"init={previous / 'last'}")
        cfg = load_config(files, overrides).as_one_process()  # a job is one process (jobs run side by side)
        t0 = time.perf_counter()
        info: dict[str, Any] = {"steps": cfg.optim.steps if stage["kind"] == "train" else cfg.probe.steps}
        if stage["kind"] == "probe":
            probe = run_balance_probes(cfg)
            info["converged"] = probe.converged
            info["weights"] = probe.weights
        else:
            train(cfg)
            info.update(_run_stats(run_dir))
        info["time_s"] = time.perf_counter() - t0
        info["peak_rss_mb"] = peak_rss_mb() if isolated else None
        total_train_s += info["time_s"]
        result["stages"][stage["name"]] = info
        log.info("%s seed %d: stage %s done in %.1f s", spec["variant"], seed, stage["name"], info["time_s"])
        if stage["kind"] == "train":
            trained.append((stage, cfg, run_dir))
        previous = run_dir
    result["time_s"] = total_train_s
    result["peak_rss_mb"] = peak_rss_mb() if isolated else None
    eval_seed = int(spec.get("eval_seed", 0))  # the same captions / images for every variant and seed
    result["metrics"] = _evaluate_models(trained, spec["eval"], eval_seed, spec.get("evaluator", "qlip"),
                                         spec.get("eval_options") or {})  # fmt: skip
    write_text_atomic(directory / "result.json", json.dumps(result, indent=2, default=str))
    return result


def _evaluate_models(trained: list[tuple[dict[str, Any], Any, Path]], ev: dict[str, Any], seed: int,
                     evaluator: str = "qlip", options: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The last stage's export, and every stage marked ``evaluate`` (keys prefixed with its name), scored by
    ``EVALUATORS[evaluator]``; every stage on the data of the FIRST stage's config (the same held-out set)."""
    if evaluator not in EVALUATORS:
        raise ValueError(f"unknown evaluator {evaluator!r}; choose from {sorted(EVALUATORS)}")
    score = EVALUATORS[evaluator]
    metrics: dict[str, Any] = {}
    for i, (stage, _cfg, run_dir) in enumerate(trained):
        final = i == len(trained) - 1
        if not (final or stage["evaluate"]):
            continue
        values = score(run_dir / "last", trained[0][1], ev, options or {}, seed)
        if final:
            metrics.update(values)
        if stage["evaluate"]:
            metrics.update({f"{stage['name']}/{k}": v for k, v in values.items()})
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m qlip.experiments.worker JOB.json", file=sys.stderr)
        return 2
    setup_logging(verbose=True)
    spec = json.loads(Path(argv[0]).read_text())
    execute_job(spec, isolated=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
