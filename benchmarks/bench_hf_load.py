"""Hugging Face bridge: how long the offline models take to load, and SmolLM2's first answer.

    python benchmarks/bench_hf_load.py --threads 2 --out benchmarks/results/hf-load-cpu.json

Times ``qlip.hf.load_causal_lm("smollm2")`` (the Q4_1 GGUF file dequantized to float32), a greedy answer to
"What is the capital of France?" through ``qlip.ar.decode`` (with the KV cache), and
``qlip.hf.load_text_encoder("minilm")``. One cold run each (a load is not repeated in one process: the second
would read files the first left in the page cache); rerun the script for another sample.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, setup_threads, write_results  # noqa: E402

from qlip.ar import Chooser, decode  # noqa: E402
from qlip.hf import load_causal_lm, load_text_encoder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    env = environment("cpu")

    start = time.perf_counter()
    lm, tok = load_causal_lm("smollm2")
    lm_load = time.perf_counter() - start
    prompt = torch.tensor([tok.encode(tok.chat_prompt("What is the capital of France?"))])
    start = time.perf_counter()
    ids = decode(lm, prompt, args.new_tokens, Chooser(guided=False, temperature=0))[0].tolist()
    answer_s = time.perf_counter() - start
    answer = tok.decode(ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids)
    start = time.perf_counter()
    enc = load_text_encoder("minilm")
    encoder_load = time.perf_counter() - start

    result = {
        "smollm2_load_s": round(lm_load, 1),
        "smollm2_answer": answer,
        "smollm2_answer_s": round(answer_s, 2),
        "smollm2_prompt_tokens": prompt.shape[1],
        "smollm2_new_tokens": args.new_tokens,
        "smollm2_parameters_m": round(sum(q.numel() for q in lm.parameters()) / 1e6, 1),
        "minilm_load_s": round(encoder_load, 1),
        "minilm_width": enc.width,
    }
    env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    for k, v in result.items():
        print(f"{k}: {v}")
    write_results("hf-load-cpu", {"environment": env, "result": result}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
