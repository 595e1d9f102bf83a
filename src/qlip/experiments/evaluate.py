"""Evaluate one trained variant with the evaluation harness on the held-out ``shapes`` split (docs/evaluation.md).

The held-out images are those the trainer itself checks against (:func:`qlip.train.data.held_out_batches`: the
``val`` split of the training data config, so the same shapes preset, sizes and image size), drawn with one fixed
seed for every variant and seed so their numbers are comparable. Metrics:

* zero-shot top-1 on every shapes task of ``eval.tasks`` (:func:`qlip.eval.zero_shot.evaluate_zero_shot_tasks`,
  the tasks' own templates), and their mean;
* linear probe top-1 per task on the frozen CLS feature (:func:`qlip.eval.linear_probe.linear_probe`, L2 chosen on
  a held-out part of a ``train``-split sample), and the mean;
* PSNR / SSIM on uint8 images and code usage (:func:`qlip.eval.recon.evaluate_reconstruction`; rFID and LPIPS need
  weight files and are left out: shapes is not a natural-image set and nothing is downloaded).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..data import SampleCollator
from ..data.loader import describe_source
from ..data.shapes import generate_shapes_sample, shapes_tasks
from ..eval.schema import summary_metrics
from ..train.config import DataSection
from ..train.data import shapes_config
from ..transforms import image_transform

log = logging.getLogger(__name__)

def shapes_batches(data: DataSection, *, image_size: int, split: str, num_samples: int, batch_size: int,
                   seed: int, tokenizer: Any = None) -> list[dict[str, Any]]:  # fmt: skip
    """Collated eval-transform batches of ``num_samples`` shapes images of ``split`` under the training config."""
    cfg = shapes_config(data, image_size)
    collate = SampleCollator(image_transform(image_size, train=False), tokenizer)
    samples = [generate_shapes_sample(i, cfg, split=split, seed=seed) for i in range(num_samples)]
    return [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


@torch.no_grad()
def evaluate_model(model_dir: str | Path, data: DataSection, *, tasks: list[str], num_eval: int,
                   num_probe_train: int, batch_size: int, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Zero-shot, linear probe, PSNR / SSIM and code usage of the model saved in ``model_dir``.

    Args:
        model_dir: a ``save_pretrained`` directory (a run's ``last/``), with its tokenizer when it has a text tower.
        data: the training data section (must be ``shapes``: its tasks give the labels).
        tasks: shapes task names to report (e.g. shape, color, position, size); those with a single class under
            ``data`` are skipped.
        num_eval: held-out (``val``) images.
        num_probe_train: ``train``-split images the linear probe is fitted on.
        batch_size: images per forward pass.
        seed: the image seed (fixed across variants).

    Returns:
        The flat metrics of :mod:`qlip.eval.schema` (accuracies in percent): ``num_eval``, ``zs/<task>``,
        ``zs/mean``, ``lp/<task>``, ``lp/mean``, ``psnr``, ``ssim``, ``distinct_codes``, ``code_entropy``,
        ``mean_bit_entropy``, ``bits_used``.
    """
    from ..eval.linear_probe import extract_features_multi, linear_probe
    from ..eval.recon import evaluate_reconstruction
    from ..eval.zero_shot import evaluate_zero_shot_tasks
    from ..factory import create_model, get_tokenizer

    if describe_source(data.train) != "shapes":
        raise ValueError(f"the experiments evaluate on the built-in shapes tasks; data.train={data.train!r} is not "
                         "shapes (use a shapes config such as configs/shapes-tiny.yaml)")  # fmt: skip
    model = create_model(str(model_dir)).eval()
    size = model.image_size
    all_tasks = shapes_tasks(shapes_config(data, size))
    unknown = [t for t in tasks if t not in all_tasks]
    if unknown:
        raise ValueError(f"unknown shapes task(s) {unknown}; choose from {sorted(all_tasks)}")
    # A task with one class (e.g. size when the config draws only large shapes) is trivially 100%: left out.
    chosen = {t: all_tasks[t] for t in tasks if len(all_tasks[t].classnames) > 1}
    held = shapes_batches(data, image_size=size, split="val", num_samples=num_eval, batch_size=batch_size, seed=seed)
    zero_shot, probes, recon = None, None, None
    if model.text is not None and chosen:
        zero_shot = evaluate_zero_shot_tasks(model, get_tokenizer(str(model_dir)), held, chosen, topk=(1,))
    if chosen:
        train = shapes_batches(data, image_size=size, split="train", num_samples=num_probe_train,
                               batch_size=batch_size, seed=seed + 7919)  # fmt: skip
        keys = list(dict.fromkeys(t.label_key for t in chosen.values()))
        x_tr, y_tr = extract_features_multi(model, train, "cls", label_keys=keys)
        x_te, y_te = extract_features_multi(model, held, "cls", label_keys=keys)
        probes = {name: linear_probe(x_tr, y_tr[task.label_key], x_te, y_te[task.label_key],
                                     num_classes=len(task.classnames), seed=seed)
                  for name, task in chosen.items()}  # fmt: skip
    if model.quantizer is not None and model.decoder is not None:
        recon = evaluate_reconstruction(model, held, keep_examples=0).metrics
    out = summary_metrics(zero_shot=zero_shot, linear_probe=probes, recon=recon)
    log.info("evaluated %s: %s", model_dir, {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()})
    return out
