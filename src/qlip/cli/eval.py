"""``qlip eval ...``: zero-shot, linear probe, reconstruction, or all three with a report.

    qlip eval zero-shot    --model M --data PATH_OR_shapes [--task shape] [--classnames imagenet] [--templates openai]
    qlip eval linear-probe --model M --data ... [--features cls|patch-mean|codes] [--train-data PATH]
    qlip eval recon        --model M --data ... [--inception-weights FILE] [--lpips-weights DIR]
    qlip eval retrieval    --model M --data PAIRS.csv   (image <-> text Recall@1/5/10, mean and median rank)
    qlip eval all          --model M --data ... --out report/ [--run-dir RUN]
    qlip eval train-judge  --out DIR [--steps 1500] [--seed 0]   (the ShapesEval judge: a CNN, no QLIP model)
    qlip eval vqa          --model VLM --data shapes --out report/  (a vision-language model on shapes questions)

``--data`` is ``shapes[:preset]`` (the held-out ``--split`` of the built-in data), a class folder (ImageNet layout;
``DATA/<split>`` is used when it exists), or anything :func:`qlip.data.build_dataset` accepts. A caption list is
labelled by ``--label-column`` (class names are the column's values) for zero-shot and the linear probe, and its
captions are what retrieval ranks. Every command writes ``report.json`` + ``report.md`` (+ pictures) into
``--out`` and prints a short table.
"""

from __future__ import annotations

import argparse
import datetime
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..eval.generation import DEMO_HELD_OUT
from .common import (
    EXIT_BAD_DATA,
    CLIError,
    add_image_options,
    check_output_dir,
    finite_float,
    fraction,
    image_transform_for,
    load_model,
    non_negative_int,
    positive_int,
    resolve_device,
)

log = logging.getLogger(__name__)

DEFAULT_SHAPES_EVAL = 1000  # held-out shapes images when --limit is not given
DEFAULT_SHAPES_TRAIN = 2000  # shapes training images for the linear probe when --train-limit is not given


def _load_model(args: argparse.Namespace, parts: tuple[str, ...] | None) -> Any:
    """The model, after the checks that need no model: --out, --device and explicit weight paths."""
    check_output_dir(args.out)
    device = resolve_device(args.device)
    inception = getattr(args, "inception_weights", None)
    if inception and not Path(inception).expanduser().is_file():
        raise CLIError(f"--inception-weights {inception}: no such file; give the path of the FID Inception weights "
                       "(see docs/metrics.md) or leave the option out to skip rFID")  # fmt: skip
    lpips = getattr(args, "lpips_weights", None)
    if lpips and not Path(lpips).expanduser().is_dir():
        raise CLIError(f"--lpips-weights {lpips}: no such folder; give the folder holding the VGG16 and LPIPS "
                       "weights (see docs/metrics.md) or leave the option out to skip LPIPS")  # fmt: skip
    return load_model(args.model, device, parts=parts)


def _tokenizer(args: argparse.Namespace, what: str = "zero-shot") -> Any:
    from ..factory import get_tokenizer

    try:
        return get_tokenizer(args.model, vocabulary=getattr(args, "tokenizer", None))
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(f"{what} needs the text tokenizer saved beside the model: {e}") from e


# ------------------------------------------------------------------------------------------------ data


def _is_shapes(data: str) -> bool:
    from ..data.loader import describe_source

    try:
        return describe_source(data) == "shapes"
    except FileNotFoundError:
        return False


def _subset(dataset: Any, indices: list[int]) -> Any:
    """A Subset that keeps the dataset's class names."""
    from torch.utils.data import Subset

    subset = Subset(dataset, indices)
    subset.classnames = getattr(dataset, "classnames", None)  # type: ignore[attr-defined]
    return subset


def open_dataset(data: str, split: str, limit: int | None, image_size: int, *, default_shapes: int,
                 label_column: str | None = None, per_image: bool = False,
                 background: str = "white") -> Any:  # fmt: skip
    """The dataset a ``--data`` / ``--split`` / ``--limit`` combination names (a subset when limited).

    ``label_column`` labels a caption list by one of its columns; ``per_image`` keeps one row per image of a caption
    list that gives an image several captions (classification counts images, not captions).
    """
    from ..data import build_dataset
    from ..data.loader import describe_source

    try:
        if _is_shapes(data):
            if label_column:
                raise CLIError(f"--label-column applies to caption lists (.csv/.tsv/.jsonl), not to {data}")
            size = min(max(image_size, 32), 256)  # shapes draws 32..256 px; the eval transform resizes the rest
            return build_dataset(data, split=split, length=limit or default_shapes, image_size=size)
        path = Path(data).expanduser()
        if (path / split).is_dir():
            path = path / split
        options: dict[str, Any] = {"background": background}
        if label_column:
            if describe_source(str(path)) != "captions":
                raise CLIError(f"--label-column applies to caption lists (.csv/.tsv/.jsonl), not to {data}; a class "
                               "folder is labelled by its subfolders")  # fmt: skip
            options["label_key"] = label_column
        dataset = build_dataset(str(path), **options)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from e
    indices = dataset.first_row_per_image() if per_image and hasattr(dataset, "first_row_per_image") else None
    if indices is not None and len(indices) < len(dataset):
        dataset = _subset(dataset, indices)
    if limit is not None and hasattr(dataset, "__len__") and limit < len(dataset):
        # Evenly spaced indices: class folders are sorted by class, so the first N would be a few classes only.
        picks = np.linspace(0, len(dataset) - 1, limit).round().astype(int).tolist()
        return _subset(dataset, picks)
    return dataset


def split_dataset(dataset: Any, test_fraction: float, seed: int) -> tuple[Any, Any]:
    """A seeded random (train, test) split of a map-style dataset, for probing a single caption list."""
    import torch

    n = len(dataset)
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n - n_test < 3:
        raise CLIError(f"{n} images are too few to split into a probe training and test part with "
                       f"--test-fraction {test_fraction}; give --train-data or more images")  # fmt: skip
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return _subset(dataset, sorted(order[n_test:])), _subset(dataset, sorted(order[:n_test]))


def _limited(loader: Any, limit: int | None) -> Any:
    """Batches of a loader, stopping after ``limit`` images (streams such as shards have no length)."""
    seen = 0
    for batch in loader:
        if limit is not None and seen >= limit:
            return
        if limit is not None and seen + batch["image"].shape[0] > limit:
            keep = limit - seen
            batch = {**batch, "image": batch["image"][:keep], "label": batch["label"][:keep],
                     "key": batch["key"][:keep], "caption": batch["caption"][:keep]}  # fmt: skip
            if "text" in batch:
                batch["text"] = batch["text"][:keep]
            if "labels" in batch:
                batch["labels"] = {k: v[:keep] for k, v in batch["labels"].items()}
        seen += batch["image"].shape[0]
        yield batch


def batches(dataset: Any, args: argparse.Namespace, image_size: int, limit: int | None, stage: str) -> Any:
    """Collated batches of the model's eval transform over ``dataset``, with a progress bar named ``stage``.

    The stage's counts of skipped samples are read back by :func:`skipped_samples` for the report.
    """
    from ..data import build_dataloader
    from ..eval.progress import TrackedBatches
    loader = build_dataloader(dataset, batch_size=args.batch_size, transform=image_transform_for(args, image_size),
                              num_workers=args.workers)  # fmt: skip
    total = len(dataset) if hasattr(dataset, "__len__") else None
    if total is not None and limit is not None:
        total = min(total, limit)
    tracked = TrackedBatches(_limited(loader, limit), desc=stage, total=total, progress=not args.quiet)
    args.stages = {**getattr(args, "stages", {}), stage: tracked}
    return tracked


def skipped_samples(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """Per evaluation stage that ran, the samples it skipped by reason (stages without any are left out)."""
    counts = {stage: t.skipped_counts() for stage, t in getattr(args, "stages", {}).items()}
    return {stage: c for stage, c in counts.items() if c}


def dataset_name(args: argparse.Namespace, split: str, limit: int | None) -> str:
    """Names the evaluated images for the FID reference cache: source, split and count."""
    source = args.data if _is_shapes(args.data) else str(Path(args.data).expanduser().resolve())
    count = limit or (DEFAULT_SHAPES_EVAL if _is_shapes(args.data) else "all")
    name = f"{source}|split={split}|n={count}"
    if (args.resize, args.background) != ("crop", "white"):  # other preprocessing: other reference statistics
        name += f"|resize={args.resize}|background={args.background}"
    return name


def _tasks(dataset: Any, args: argparse.Namespace, model_has_text: bool) -> dict[str, Any]:
    """The classification tasks of a dataset: shapes tasks, or one task over the folder's labels."""
    from ..eval.zero_shot import ClassificationTask, load_classnames, load_templates

    try:
        if _is_shapes(args.data):
            tasks = dict(dataset.tasks)
            wanted = args.task or list(tasks)
            unknown = [t for t in wanted if t not in tasks]
            if unknown:
                raise CLIError(f"unknown shapes task(s) {unknown}; choose from {sorted(tasks)}")
            tasks = {t: tasks[t] for t in wanted}
            if args.templates:
                templates = tuple(load_templates(args.templates))
                tasks = {n: ClassificationTask(t.classnames, templates, t.label_key) for n, t in tasks.items()}
            return tasks
        folder_names = getattr(dataset, "classnames", None)
        if args.classnames:
            names = load_classnames(args.classnames)
        elif folder_names and len(folder_names) == 1000 and all(n.startswith("n") and n[1:].isdigit()
                                                                 for n in folder_names):  # fmt: skip
            names = load_classnames("imagenet")  # ImageNet synset folders: sorted synsets = CLIP's label order
        elif folder_names:
            names = list(folder_names)
        elif getattr(args, "label_column", None):
            raise CLIError(f"the label column {args.label_column!r} of {args.data} holds whole numbers, not class "
                           "names; give --classnames FILE with one name per label, in label order")  # fmt: skip
        else:
            raise CLIError(f"{args.data} has no class labels; zero-shot and linear probes need a class folder, "
                           "shapes, or a caption list with --label-column COLUMN")  # fmt: skip
        if folder_names and len(names) != len(folder_names):
            what = (f"values in its label column {args.label_column!r}" if getattr(args, "label_column", None)
                    else "class folders")  # fmt: skip
            raise CLIError(f"--classnames gives {len(names)} names but {args.data} has {len(folder_names)} {what}; "
                           "give one name per class, in sorted order")  # fmt: skip
        templates = load_templates(args.templates or "openai") if model_has_text else ("{}",)
        return {"label": ClassificationTask(tuple(names), tuple(templates), None)}
    except ValueError as e:
        raise CLIError(str(e)) from e


# ------------------------------------------------------------------------------------------------ sections


def run_zero_shot(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ..eval.zero_shot import evaluate_zero_shot_tasks

    tokenizer = _tokenizer(args)
    dataset = open_dataset(args.data, args.split, args.limit, model.image_size, default_shapes=DEFAULT_SHAPES_EVAL,
                           label_column=args.label_column, per_image=True, background=args.background)  # fmt: skip
    tasks = _tasks(dataset, args, model_has_text=True)
    try:
        stream = batches(dataset, args, model.image_size, args.limit, "zero-shot")
        return evaluate_zero_shot_tasks(model, tokenizer, stream, tasks, topk=(1, 5),
                                        batch_size=max(args.batch_size, 64))  # fmt: skip
    except (ValueError, KeyError) as e:
        raise CLIError(str(e)) from e


def run_linear_probe(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ..eval.linear_probe import extract_features_multi, linear_probe

    size = model.image_size
    column = args.label_column
    train_source = args.train_data or args.data
    if column and not args.train_data:  # one labelled list: a seeded split into the probe's training and test part
        whole = open_dataset(args.data, args.split, None, size, default_shapes=0, label_column=column, per_image=True,
                             background=args.background)
        train, test = split_dataset(whole, args.test_fraction, args.seed)
        if args.limit is not None and args.limit < len(test):
            test = _subset(test, list(range(args.limit)))
        if args.train_limit is not None and args.train_limit < len(train):
            train = _subset(train, list(range(args.train_limit)))
    else:
        if not _is_shapes(train_source) and not args.train_data and not (Path(args.data) / args.train_split).is_dir():
            raise CLIError(f"the linear probe needs a training split: {args.data}/{args.train_split} does not exist; "
                           "pass --train-data DIR (a class folder with the same classes), or --label-column COLUMN "
                           "for a caption list")  # fmt: skip
        test = open_dataset(args.data, args.split, args.limit, size, default_shapes=DEFAULT_SHAPES_EVAL,
                            label_column=column, per_image=True, background=args.background)  # fmt: skip
        train = open_dataset(train_source, args.train_split, args.train_limit, size,
                             default_shapes=DEFAULT_SHAPES_TRAIN, label_column=column, per_image=True,
                             background=args.background)  # fmt: skip
        if getattr(train, "classnames", None) != getattr(test, "classnames", None):
            raise CLIError(f"--train-data {train_source} has the classes {getattr(train, 'classnames', None)} but "
                           f"{args.data} has {getattr(test, 'classnames', None)}; the probe needs the same classes "
                           "in both")  # fmt: skip
    tasks = _tasks(test, args, model_has_text=False)
    keys = list(dict.fromkeys(t.label_key for t in tasks.values()))
    results: dict[str, Any] = {}
    try:
        # Features are extracted once per split; every task's labels come along.
        x_tr, y_tr = extract_features_multi(model, batches(train, args, size, args.train_limit, "linear-probe train"),
                                            args.features,
                                            label_keys=keys)  # fmt: skip
        x_te, y_te = extract_features_multi(model, batches(test, args, size, args.limit, "linear-probe test"),
                                            args.features, label_keys=keys)  # fmt: skip
        for task_name, task in tasks.items():
            k = task.label_key
            r = linear_probe(x_tr, y_tr[k], x_te, y_te[k], num_classes=len(task.classnames), seed=args.seed)
            results[task_name] = {"features": args.features, **r}
    except (ValueError, KeyError) as e:
        raise CLIError(str(e)) from e
    return results


def run_recon(model: Any, args: argparse.Namespace) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor]]:
    from ..eval.fid import load_fid_network
    from ..eval.recon import evaluate_reconstruction, resolve_lpips_weights

    dataset = open_dataset(args.data, args.split, args.limit, model.image_size, default_shapes=DEFAULT_SHAPES_EVAL,
                           background=args.background)
    fid = load_fid_network(Path(args.inception_weights).expanduser() if args.inception_weights else None)
    lpips = resolve_lpips_weights(args.lpips_weights)
    for option, given, network in (("--inception-weights", args.inception_weights, fid),
                                   ("--lpips-weights", args.lpips_weights, lpips)):  # fmt: skip
        if given and network.reason is not None:  # asked for by name: unusable weights are an error, not a skip
            raise CLIError(f"{option} {given}: {network.reason}")
    try:
        result = evaluate_reconstruction(
            model, batches(dataset, args, model.image_size, args.limit, "recon"), fid_network=fid, lpips_network=lpips,
            dataset_name=dataset_name(args, args.split, args.limit), reference_cache_dir=args.fid_cache,
            keep_examples=args.num_examples,
        )  # fmt: skip
    except ValueError as e:
        raise CLIError(str(e)) from e
    return result.metrics, (result.originals, result.reconstructions)


def run_retrieval(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Image <-> text retrieval over the pairs of a caption list (several rows may give one image)."""
    from ..data.sample import BadDataError
    from ..eval.retrieval import evaluate_retrieval

    if _is_shapes(args.data):
        raise CLIError(f"--data {args.data}: shapes captions repeat across images, so retrieval would rank equal "
                       "captions; evaluate retrieval on image-caption pairs (a .csv/.tsv/.jsonl list or shards) "
                       "and shapes with zero-shot")  # fmt: skip
    tokenizer = _tokenizer(args, "retrieval")
    dataset = open_dataset(args.data, args.split, args.limit, model.image_size, default_shapes=0,
                           background=args.background)
    stream = batches(dataset, args, model.image_size, args.limit, "retrieval")
    try:
        return evaluate_retrieval(model, stream, tokenizer=tokenizer)
    except ValueError as e:
        if stream.skipped and not stream.images:
            raise BadDataError(f"--data {args.data}: no readable pair; {bad_data_line(stream)}") from e
        if "caption" in str(e):
            raise CLIError(f"--data {args.data} has images without a caption; retrieval needs image-caption pairs "
                           "(a .csv/.tsv/.jsonl caption list, or shards with captions)") from e
        raise CLIError(str(e)) from e


def bad_data_line(stage: Any) -> str:
    """One line naming and counting the samples an evaluation stage skipped, by reason."""
    total = sum(stage.skipped.values())
    parts = []
    for reason, n in sorted(stage.skipped.items()):
        names = stage.examples.get(reason, [])
        more = ", ..." if n > len(names) else ""
        parts.append(f"{n} {reason.replace('_', ' ')} ({', '.join(names)}{more})" if names else f"{n} {reason}")
    return f"skipped {total} of {total + stage.images} samples: {'; '.join(parts)}"


# ------------------------------------------------------------------------------------------------ commands


def _base_report(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    from .. import __version__

    return {
        "model": args.model, "architecture": model.cfg.name, "data": args.data, "split": args.split,
        "limit": args.limit, "device": str(model.device), "qlip_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def _finish(report: dict[str, Any], args: argparse.Namespace, examples: Any = None, run_dir: Any = None) -> None:
    from ..eval.report import (
        format_table,
        linear_probe_rows,
        recon_rows,
        retrieval_rows,
        skipped_rows,
        write_report,
        zero_shot_rows,
    )

    if report.get("zero_shot"):
        print("zero-shot\n" + format_table(zero_shot_rows(report["zero_shot"])) + "\n")
    if report.get("retrieval"):
        print("retrieval\n" + format_table(retrieval_rows(report["retrieval"])) + "\n")
    if report.get("linear_probe"):
        print("linear probe\n" + format_table(linear_probe_rows(report["linear_probe"])) + "\n")
    if report.get("recon"):
        print("reconstruction\n" + format_table(recon_rows(report["recon"])) + "\n")
        for key in ("lpips", "rfid"):
            m = report["recon"][key]
            if not m["available"]:
                print(f"{key}: unavailable ({m['reason']})")
    for name, reason in (report.get("skipped") or {}).items():
        print(f"{name}: skipped ({reason})")
    skipped = skipped_samples(args)
    if skipped:
        report["skipped_samples"] = skipped
        print("skipped samples\n" + format_table(skipped_rows(skipped)) + "\n")
    paths = write_report(report, args.out, examples=examples, run_dir=run_dir)
    print(f"wrote {paths['json']} and {paths['markdown']} ({len(paths) - 2} picture(s))")


def cmd_zero_shot(args: argparse.Namespace) -> int:
    model = _load_model(args, parts=("vision", "text"))
    report = _base_report(args, model)
    report["zero_shot"] = run_zero_shot(model, args)
    _finish(report, args)
    return 0


def cmd_linear_probe(args: argparse.Namespace) -> int:
    model = _load_model(args, parts=("vision", "quantizer") if args.features == "codes" else ("vision",))
    report = _base_report(args, model)
    report["linear_probe"] = run_linear_probe(model, args)
    _finish(report, args)
    return 0


def cmd_retrieval(args: argparse.Namespace) -> int:
    import sys

    model = _load_model(args, parts=("vision", "text"))
    report = _base_report(args, model)
    report["retrieval"] = run_retrieval(model, args)
    _finish(report, args)
    stage = args.stages["retrieval"]
    if stage.skipped:  # the report covers the readable pairs; the unreadable ones are bad data
        print(f"bad data: {args.data}: {bad_data_line(stage)}", file=sys.stderr)
        return EXIT_BAD_DATA
    return 0


def cmd_recon(args: argparse.Namespace) -> int:
    model = _load_model(args, parts=("vision", "quantizer", "decoder"))
    report = _base_report(args, model)
    report["recon"], examples = run_recon(model, args)
    _finish(report, args, examples=examples)
    return 0


def cmd_all(args: argparse.Namespace) -> int:
    model = _load_model(args, parts=None)
    report = _base_report(args, model)

    skipped: dict[str, str] = {}
    if model.text is None:
        skipped["zero_shot"] = "the model has no text tower"
    else:
        try:
            report["zero_shot"] = run_zero_shot(model, args)
        except CLIError as e:  # a missing tokenizer or unlabeled data must not cost the other sections
            skipped["zero_shot"] = str(e)
    if model.text is None:
        skipped["retrieval"] = "the model has no text tower"
    else:
        try:
            report["retrieval"] = run_retrieval(model, args)
        except CLIError as e:  # shapes, or images without captions
            skipped["retrieval"] = str(e)
    try:
        report["linear_probe"] = run_linear_probe(model, args)
    except CLIError as e:
        skipped["linear_probe"] = str(e)
    examples = None
    if model.decoder is None or model.quantizer is None:
        skipped["recon"] = "the model has no quantizer/decoder"
    else:
        report["recon"], examples = run_recon(model, args)
    if skipped:
        report["skipped"] = skipped
    _finish(report, args, examples=examples, run_dir=args.run_dir)
    return 0


def cmd_train_judge(args: argparse.Namespace) -> int:
    import shlex

    from ..eval.judge import check_judge_target, train_judge

    out = check_output_dir(args.out)
    try:
        check_judge_target(out)
    except FileExistsError as e:
        raise CLIError(f"--out {e}") from e
    command = shlex.join(["qlip", "eval", "train-judge", "--out", str(out), "--steps", str(args.steps), "--seed",
                          str(args.seed), "--num-train", str(args.num_train), "--num-eval", str(args.num_eval)])
    _, report = train_judge(out, steps=args.steps, seed=args.seed, num_train=args.num_train,
                            num_eval=args.num_eval, command=command)  # fmt: skip
    acc = report["accuracy"]
    print(f"judge saved to {out} ({report['train_seconds']:.0f} s): held-out accuracy shape {acc['shape']:.1f}%, "
          f"color {acc['color']:.1f}%, position {acc['position']:.1f}%, all {acc['all']:.1f}%")  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------------------ parser


def cmd_generation(args: argparse.Namespace) -> int:
    """ShapesEval of a text-to-image generator on held-out captions, the judge's ceiling, the CLIP score."""
    from .. import __version__
    from ..data.loader import shapes_config_from_spec
    from ..eval.generation import evaluate_generator
    from ..eval.judge import load_judge
    from ..generation import GenerationInputError, load

    if not _is_shapes(args.data):
        raise CLIError(f"--data {args.data}: ShapesEval reads shapes captions; give a shapes spec such as "
                       f"{DEMO_HELD_OUT!r}")  # fmt: skip
    out = check_output_dir(args.out)
    device = resolve_device(args.device)
    try:
        config = shapes_config_from_spec(args.data)
        judge = load_judge(args.judge)
        gen = load(args.model, device=device)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    try:
        result = evaluate_generator(gen, judge, config, split=args.split, limit=args.limit,
                                    batch_size=args.batch_size, cfg_scale=args.cfg, temperature=args.temperature,
                                    top_k=args.top_k, top_p=args.top_p, seed=args.seed)  # fmt: skip
    except GenerationInputError as e:  # a sampling setting out of range
        raise CLIError(str(e)) from e
    except ValueError as e:  # captions ShapesEval cannot read
        raise CLIError(f"--data {args.data}: {e}") from e
    metrics, captions, images = result.metrics, result.captions, result.images
    report = {"model": args.model, "data": args.data, "split": args.split, "limit": args.limit, "cfg_scale": args.cfg,
              "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
              "judge": args.judge, "qlip_version": __version__, "metrics": metrics,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    from ..eval.report import write_report
    from ..fileio import atomic_write

    for key, value in metrics.items():
        print(f"{key}\t{value:.2f}" if isinstance(value, float) else f"{key}\t{value}")
    shown = images[:16]
    if shown:
        from PIL import Image

        row = np.concatenate([np.asarray(im.convert("RGB")) for im in shown], axis=1)
        atomic_write(out / "samples.png", lambda tmp: Image.fromarray(row).save(tmp, format="PNG"))
        atomic_write(out / "samples.txt", lambda tmp: tmp.write_text("\n".join(captions[: len(shown)]) + "\n"))
    paths = write_report(report, out)
    print(f"wrote {paths['json']} and {paths['markdown']}; samples.png shows the first {len(shown)} samples "
          "(captions in samples.txt)")
    return 0


def cmd_vqa(args: argparse.Namespace) -> int:
    """Shapes questions on held-out images and phrasings: accuracy per type, hallucination, the blind baseline."""
    from .. import __version__
    from ..data.loader import shapes_config_from_spec
    from ..eval.report import write_report
    from ..understanding import UnderstandingError, load
    from ..understanding.evaluate import evaluate_shapes_vqa

    data = DEMO_HELD_OUT if args.data == "shapes" else args.data
    if not _is_shapes(data):
        raise CLIError(f"--data {args.data}: the VQA check asks shapes questions; give shapes or a shapes spec such "
                       f"as {DEMO_HELD_OUT!r}")  # fmt: skip
    out = check_output_dir(args.out)
    device = resolve_device(args.device)
    try:
        vlm = load(args.model, device=device)
        config = shapes_config_from_spec(data, vlm.tower.image_size)
        result = evaluate_shapes_vqa(vlm, config, num_images=args.limit, split=args.split, seed=args.seed,
                                     phrasings=args.phrasings, batch_size=args.batch_size)  # fmt: skip
    except (UnderstandingError, ValueError) as e:
        raise CLIError(str(e)) from e
    metrics = result["metrics"]
    report = {"model": args.model, "data": data, "split": args.split, "limit": args.limit, "phrasings": args.phrasings,
              "seed": args.seed, "qlip_version": __version__, "metrics": metrics, "examples": result["examples"],
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    for key, value in metrics.items():
        print(f"{key}\t{value:.2f}" if isinstance(value, float) else f"{key}\t{value}")
    paths = write_report(report, out)
    print(f"wrote {paths['json']} and {paths['markdown']}")
    return 0


def _common(p: argparse.ArgumentParser, out_default: str) -> None:
    p.add_argument("--model", required=True, help="model directory, registered name or hf-hub:ORG/NAME")
    p.add_argument("--data", required=True, help="shapes[:preset], a class folder (ImageNet layout), or a source "
                   "build_dataset accepts")  # fmt: skip
    p.add_argument("--split", default="val", help="shapes split, or DATA/<split> of a folder when it exists (val)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help=f"evaluate at most N images (shapes default {DEFAULT_SHAPES_EVAL}; folders: evenly spaced)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", default=out_default, help=f"report directory (default {out_default})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_image_options(p)


def _zero_shot_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", action="append", help="shapes task (repeatable; default: every task)")
    p.add_argument("--classnames", default=None, help="'imagenet', or a text file with one class name per line")
    p.add_argument("--templates", default=None, help="'openai' (default for folders), or a text file of templates")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="vocab.json + merges.txt to use instead of the model's (e.g. from qlip tokenizer train)")
    p.add_argument("--label-column", default=None, metavar="COLUMN",
                   help="caption lists: the column that labels each image (its values are the class names)")


def _probe_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", choices=("cls", "patch-mean", "codes"), default="cls")
    p.add_argument("--train-data", default=None, help="training images for the probe (default: DATA/<train-split>)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--train-limit", type=positive_int, default=None,
                   help=f"at most N training images (shapes default {DEFAULT_SHAPES_TRAIN})")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out part used to choose the L2 strength "
                   "(and of the train/test split of a single labelled caption list)")
    p.add_argument("--test-fraction", type=fraction, default=0.3,
                   help="a single caption list with --label-column: share of its images the probe is scored on")


def _recon_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth (for rFID)")
    p.add_argument("--lpips-weights", default=None, help="directory with vgg16-397923af.pth and vgg.pth (for LPIPS)")
    p.add_argument("--fid-cache", default=str(Path("~/.cache/qlip/fid-stats").expanduser()),
                   help="directory of cached FID reference statistics (.npz)")
    p.add_argument("--num-examples", type=non_negative_int, default=8, help="images in the reconstruction grid")


def register(subparsers: Any) -> None:
    """Register ``qlip eval {zero-shot,linear-probe,retrieval,recon,all,generation,train-judge}``."""
    p = subparsers.add_parser("eval", help="evaluate a model: zero-shot, linear probe, retrieval, reconstruction, "
                              "reports")  # fmt: skip
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="SUBCOMMAND")

    z = sub.add_parser("zero-shot", help="zero-shot classification (class names x prompt templates)")
    _common(z, "report-zero-shot")
    _zero_shot_flags(z)
    z.set_defaults(func=cmd_zero_shot)

    lp = sub.add_parser("linear-probe", help="logistic regression on frozen features")
    _common(lp, "report-linear-probe")
    _zero_shot_flags(lp)
    _probe_flags(lp)
    lp.set_defaults(func=cmd_linear_probe)

    t = sub.add_parser("retrieval", help="image <-> text retrieval (Recall@1/5/10, mean and median rank) on pairs")
    _common(t, "report-retrieval")
    t.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="vocab.json + merges.txt to use instead of the model's (e.g. from qlip tokenizer train)")
    t.set_defaults(func=cmd_retrieval)

    r = sub.add_parser("recon", help="reconstruction metrics (PSNR, SSIM, LPIPS, rFID) and code usage")
    _common(r, "report-recon")
    _recon_flags(r)
    r.set_defaults(func=cmd_recon)

    a = sub.add_parser("all", help="every evaluation, written as report.json + report.md + pictures")
    _common(a, "report")
    _zero_shot_flags(a)
    _probe_flags(a)
    _recon_flags(a)
    a.add_argument("--run-dir", default=None, help="training run directory (metrics.jsonl) for the loss curves")

    g = sub.add_parser("generation", help="ShapesEval of a text-to-image generator on held-out captions")
    g.add_argument("--model", required=True, help="a generator directory (run_dir/last of a text-to-image run)")
    g.add_argument("--judge", default="docs/results/judge", help="a ShapesEval judge (qlip eval train-judge)")
    g.add_argument("--data", default=DEMO_HELD_OUT, help="the shapes whose captions are drawn (default: the demo's "
                   "held-out compositions)")  # fmt: skip
    g.add_argument("--split", default="test", choices=("val", "test"))
    g.add_argument("--limit", type=positive_int, default=200, help="captions (default 200)")
    g.add_argument("--batch-size", type=positive_int, default=32)
    g.add_argument("--cfg", type=finite_float, default=3.0, help="guidance scale (default 3)")
    g.add_argument("--temperature", type=finite_float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=finite_float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--out", default="report-generation", help="report directory (default report-generation)")
    g.set_defaults(func=cmd_generation)
    a.set_defaults(func=cmd_all)

    v = sub.add_parser("vqa", help="a vision-language model on shapes questions: accuracy per type, hallucination, "
                       "blind baseline")  # fmt: skip
    v.add_argument("--model", required=True, help="a VLM directory (run_dir/last of a `task: vlm` run)")
    v.add_argument("--data", default="shapes", help="shapes (the demo's held-out compositions) or a shapes spec")
    v.add_argument("--split", default="test", choices=("val", "test"))
    v.add_argument("--limit", type=positive_int, default=200, help="images, one question of each type each (200)")
    v.add_argument("--phrasings", default="held_out", choices=("held_out", "train", "all"),
                   help="question phrasings: held_out (default, never seen in training), train or all")
    v.add_argument("--batch-size", type=positive_int, default=64)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    v.add_argument("--out", default="report-vqa", help="report directory (default report-vqa)")
    v.set_defaults(func=cmd_vqa)

    j = sub.add_parser("train-judge", help="train the ShapesEval judge (a small CNN) on real shapes images")
    j.add_argument("--out", required=True, help="judge folder (config.json, model.safetensors, judge.json)")
    j.add_argument("--steps", type=positive_int, default=1500, help="optimizer steps (1500)")
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--num-train", type=positive_int, default=6000, help="training images (6000)")
    j.add_argument("--num-eval", type=positive_int, default=2000, help="held-out images for the accuracy (2000)")
    j.set_defaults(func=cmd_train_judge)

    from .unified_eval import add_eval_unified  # the unified model's evaluation lives beside its own command

    add_eval_unified(sub, DEMO_HELD_OUT)
