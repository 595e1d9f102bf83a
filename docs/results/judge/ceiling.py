"""The ShapesEval judge's ceiling for demo tokenizers: its accuracy on 1,000 real held-out shapes images and on each
model's reconstructions of them (qlip.eval.generation.judge_ceiling), written to docs/results/judge/ceiling.json.

    python docs/results/judge/ceiling.py MODEL_DIR [MODEL_DIR ...]
"""

import json
import sys
import time

import torch

import qlip
from qlip.eval.generation import judge_ceiling
from qlip.eval.judge import demo_shapes_config, load_judge
from qlip.fileio import write_json_atomic
from qlip.inference import cpu_name

OUT = "docs/results/judge/ceiling.json"


def main(models: list[str]) -> None:
    judge = load_judge("docs/results/judge")
    out = {"command": "python docs/results/judge/ceiling.py " + " ".join(models), "num_images": 1000,
           "split": "test", "shapes": demo_shapes_config().to_dict(),
           "hardware": {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads()}}
    for name in models:
        t = time.perf_counter()
        model = qlip.create_model(name).eval()
        out[name] = judge_ceiling(judge, demo_shapes_config(), num_images=1000, model=model)
        out[name]["seconds"] = round(time.perf_counter() - t, 1)
        print(name, json.dumps(out[name]))
    write_json_atomic(OUT, out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
