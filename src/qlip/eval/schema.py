"""The one evaluation vocabulary: metric keys, their units, and the thresholds behind them.

Every place that states a model's quality uses these flat keys, built by :func:`summary_metrics` from the detailed
results of the evaluation functions: the trainer's held-out checks (``metrics.jsonl``, kind ``eval``), the
``metrics`` block of a ``qlip eval`` report, and the experiments' result tables.

=======================  ========  ================================================================================
key                      unit      meaning
=======================  ========  ================================================================================
``zs/<task>``            percent   zero-shot top-1 accuracy on one task (0..100)
``zs/mean``              percent   mean of the ``zs/<task>`` values
``lp/<task>``            percent   linear-probe top-1 accuracy on one task (0..100)
``lp/mean``              percent   mean of the ``lp/<task>`` values
``i2t/r<K>``             percent   image -> text Recall@K, K = 1, 5, 10 (an image is right when any of its captions
                                   is among the K best; ties count against the model), 0..100
``t2i/r<K>``             percent   text -> image Recall@K (each caption has one image), 0..100
``i2t/mean_rank``        rank      mean rank of an image's best-ranked caption (1 = first); ``i2t/median_rank``
``t2i/mean_rank``        rank      mean rank of a caption's image; ``t2i/median_rank``
``psnr``                 dB        mean per-image PSNR on 0..255
``ssim``                 --        mean per-image SSIM (0..1)
``lpips``                --        mean LPIPS distance (only when its weights were given)
``rfid``                 --        reconstruction FID (only when its weights were given)
``distinct_codes``       count     distinct token indices over the evaluated images
``code_entropy``         bits      entropy of the empirical token-index distribution
``mean_bit_entropy``     bits      per-bit usage entropy, averaged over the d bits (0..1)
``bits_used``            fraction  share of the d bits whose usage entropy exceeds :data:`USED_BIT_ENTROPY` (0..1)
``gen/<task>``           percent   ShapesEval: generated images whose shape / color / position the judge reads as
                                   the caption asked (``gen/shape``, ``gen/color``, ``gen/position``), 0..100
``gen/all``              percent   ShapesEval: generated images right on all three attributes at once
``judge_real/<task>``    percent   the ShapesEval judge's accuracy on real held-out shapes images (its ceiling)
``judge_recon/<task>``   percent   the judge's accuracy on a QLIP model's reconstructions of those images
``clip_score``           --        100 x mean cosine of image and caption QLIP embeddings (generated images)
``text_ppl``             --        held-out text perplexity of a language / unified model (exp of the mean NLL)
``text_ppl_init``        --        the same for the language model a unified model started from
``text_ppl_change``      percent   change of ``text_ppl`` from ``text_ppl_init`` (negative: better)
``cap/<task>``           percent   image->text: captions that name the image's true shape / color / position
``cap/all``              percent   image->text: captions right on all three attributes at once
``vqa/<type>``           percent   visual question answering: exact-match accuracy on one question type
                                   (``vqa/color``, ``vqa/shape``, ``vqa/position``, ``vqa/size``, ``vqa/yesno``)
``vqa/mean``             percent   mean of the ``vqa/<type>`` values
``hallucination``        percent   share of "yes" answers to yes/no questions about attributes the image lacks
``vqa_blind/<type>``     percent   the same accuracies with the image features replaced by zeros (language prior)
``vqa_blind/mean``       percent   mean of the ``vqa_blind/<type>`` values
``hallucination_blind``  percent   the hallucination rate of that blind model
``num_eval``             count     images evaluated (questions, for ``vqa``)
=======================  ========  ================================================================================

Accuracies are stated in percent everywhere a person reads them (these keys, report tables, experiment tables).
The calculators underneath (:func:`qlip.eval.zero_shot.accuracy_summary`, :func:`qlip.eval.linear_probe.
linear_probe`) return the share of correct samples, ``top1`` / ``top5`` in [0, 1]; :func:`percent` is the one
conversion. A run with several stages prefixes a stage's keys with ``<stage>/`` (``stage1/psnr``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

USED_BIT_ENTROPY = 0.9  # a bit counts as used when its usage entropy over the evaluated set exceeds this (bits)

# key (``<task>`` for any task name) -> unit, as in the module docstring.
METRIC_UNITS: dict[str, str] = {
    "zs/<task>": "%",
    "zs/mean": "%",
    "lp/<task>": "%",
    "lp/mean": "%",
    **{f"{d}/r{k}": "%" for d in ("i2t", "t2i") for k in (1, 5, 10)},
    **{f"{d}/{r}": "rank" for d in ("i2t", "t2i") for r in ("mean_rank", "median_rank")},
    "psnr": "dB",
    "ssim": "",
    "lpips": "",
    "rfid": "",
    "distinct_codes": "count",
    "code_entropy": "bits",
    "mean_bit_entropy": "bits",
    "bits_used": "fraction",
    "gen/<task>": "%",
    "judge_real/<task>": "%",
    "judge_recon/<task>": "%",
    "clip_score": "",
    "text_ppl": "",
    "text_ppl_init": "",
    "text_ppl_change": "%",
    "cap/<task>": "%",
    "vqa/<task>": "%",
    "vqa/mean": "%",
    "hallucination": "%",
    "vqa_blind/<task>": "%",
    "vqa_blind/mean": "%",
    "hallucination_blind": "%",
    "num_eval": "count",
}


def metric_unit(key: str) -> str:
    """The unit of a flat metric key ("%", "dB", "bits", "count", "fraction", "rank" or "" for unitless).

    Raises:
        KeyError: ``key`` is not in the vocabulary (a ``<stage>/`` prefix is allowed).
    """
    parts = key.split("/")
    for start in range(len(parts)):  # strip stage prefixes such as "stage1/"
        rest = parts[start:]
        name = "/".join(rest)
        if name in METRIC_UNITS:
            return METRIC_UNITS[name]
        if len(rest) == 2 and f"{rest[0]}/<task>" in METRIC_UNITS:
            return METRIC_UNITS[f"{rest[0]}/<task>"]
    raise KeyError(f"{key!r} is not an evaluation metric; the keys are {sorted(METRIC_UNITS)}")


def percent(fraction: float) -> float:
    """A share in [0, 1] (a calculator's ``top1``) as the percent every report states."""
    return 100.0 * float(fraction)


def bits_used(bit_entropy: Sequence[float]) -> float:
    """Share of bits whose usage entropy exceeds :data:`USED_BIT_ENTROPY`."""
    if not len(bit_entropy):
        raise ValueError("bits_used needs the usage entropy of at least one bit")
    return sum(float(e) > USED_BIT_ENTROPY for e in bit_entropy) / len(bit_entropy)


def _accuracies(prefix: str, results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    out = {f"{prefix}/{task}": percent(r["top1"]) for task, r in results.items()}
    if out:
        out[f"{prefix}/mean"] = sum(out.values()) / len(out)
    return out


def summary_metrics(
    *,
    zero_shot: Mapping[str, Mapping[str, Any]] | None = None,
    linear_probe: Mapping[str, Mapping[str, Any]] | None = None,
    recon: Mapping[str, Any] | None = None,
    retrieval: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The flat metrics of the module docstring from the detailed results of each evaluation.

    Args:
        zero_shot: task -> summary (:func:`qlip.eval.zero_shot.evaluate_zero_shot_tasks`).
        linear_probe: task -> result (:func:`qlip.eval.linear_probe.linear_probe`).
        recon: the metrics of :func:`qlip.eval.recon.evaluate_reconstruction` (``ReconResult.metrics``).
        retrieval: the summary of :func:`qlip.eval.retrieval.retrieval_summary`.

    Returns:
        ``zs/...``, ``lp/...``, ``i2t/...`` and ``t2i/...``, the reconstruction and code-usage keys, and
        ``num_eval``, for what was given
        (LPIPS and rFID only when available).
    """
    out: dict[str, Any] = {}
    if recon:
        out["num_eval"] = int(recon["num_images"])
    elif zero_shot:
        out["num_eval"] = int(next(iter(zero_shot.values()))["n"])
    elif linear_probe:
        out["num_eval"] = int(next(iter(linear_probe.values()))["n_test"])
    elif retrieval:
        out["num_eval"] = int(retrieval["num_images"])
    out.update(_accuracies("zs", zero_shot or {}))
    out.update(_accuracies("lp", linear_probe or {}))
    for direction in ("i2t", "t2i"):
        for key, value in (retrieval or {}).get(direction, {}).items():
            name = key.lower().replace("@", "") if key.startswith("R@") else key  # "R@5" -> "r5"
            out[f"{direction}/{name}"] = percent(value) if key.startswith("R@") else float(value)
    if recon:
        for key in ("psnr", "ssim", "lpips", "rfid"):
            metric = recon.get(key) or {}
            if metric.get("available"):
                out[key] = float(metric["value"])
        usage = recon["usage"]
        out["distinct_codes"] = int(usage["distinct_codes"])
        out["code_entropy"] = float(usage["code_entropy"])
        out["mean_bit_entropy"] = float(usage["mean_bit_entropy"])
        out["bits_used"] = bits_used(usage["bit_entropy"])
    return out
