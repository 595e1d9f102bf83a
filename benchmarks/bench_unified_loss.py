"""The unified model's training loss: the output head over every position and the whole vocabulary (then the split
softmax of :func:`qlip.unified.split_nll`) against the training path of ``UnifiedLM.forward(ids, targets, mask)``
(the head only at the masked-in targets, over each target's own vocabulary). Forward + backward of one batch.

    python benchmarks/bench_unified_loss.py --threads 2 --out benchmarks/results/unified-loss-cpu.json

The model is the demo's architecture (configs/um3-shapes.yaml: width 128, depth 4, 2,048 text ids + 2 markers +
2 x 1,024 visual ids; random weights, which do not change the cost). The batch mimics a mixed batch of 32 rows of
150 positions at the demo's end ratios 2:2:3: 14 text->image rows (128 image targets each), 9 image->text rows (a
16-token caption) and 9 text rows (128 targets).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, median, print_table, setup_threads, time_interleaved, write_results  # noqa: E402

from qlip.unified import ImageVocab, UnifiedLM, extend_vocabulary, split_nll, text_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    setup_threads(args.threads)
    torch.manual_seed(0)
    lm = UnifiedLM(text_config(2048, 2046, 2047, width=128, depth=4, heads=4, max_seq_len=256))
    model = extend_vocabulary(lm, ImageVocab("qlip-shapes-s", grid=8, bits=20, parts=2)).train()
    c = model.cfg
    b, t = 32, 150
    ids = torch.randint(0, c.text_vocab, (b, t))
    ids[:, 20:148] = torch.randint(c.visual_start, c.vocab_size, (b, 128))
    mask = torch.zeros(b, t - 1, dtype=torch.bool)
    mask[:14, 19:147] = True  # text->image: the image
    mask[14:23, 130:146] = True  # image->text: the caption
    mask[23:, :128] = True  # text

    def full() -> float:
        nll = split_nll(model(ids[:, :-1]), ids[:, 1:], c.text_vocab, c.visual_start) * mask
        loss = nll.sum() / mask.sum()
        model.zero_grad(set_to_none=True)
        loss.backward()
        return float(loss)

    def training_path() -> float:
        loss = model(ids[:, :-1], ids[:, 1:], mask).sum() / mask.sum()
        model.zero_grad(set_to_none=True)
        loss.backward()
        return float(loss)

    assert abs(full() - training_path()) < 1e-4 * abs(full())
    times = time_interleaved({"full logits": full, "training path": training_path}, repeats=args.repeats)
    base = median(times["full logits"])
    rows = [{"variant": k, "s_per_step": median(v), "speedup": base / median(v), "rows_s": b / median(v)}
            for k, v in times.items()]  # fmt: skip
    write_results("unified-loss", {"environment": environment("cpu"), "batch": [b, t], "rows": rows}, args.out)
    print_table(rows, ["variant", "s_per_step", "speedup", "rows_s"])


if __name__ == "__main__":
    main()
