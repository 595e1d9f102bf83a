"""How much of a shapes image's shape class survives in a QLIP model's tokens.

A linear classifier (softmax regression, full batch, Adam) reads the shape class of held-out shapes images from
(a) the token bits (64 tokens x d bits) and (b) the encoder's last-block patch features before the quantizer; the
judge of `qlip eval generation` reads it from the decoder's reconstructions (`qlip.eval.generation.judge_ceiling`).
Usage: python docs/results/t2i/shape-information/probe.py OUT.json MODEL_DIR [MODEL_DIR ...]
"""

import json
import platform
import sys
import time

import torch
from PIL import Image

import qlip
from qlip.eval.generation import judge_ceiling
from qlip.eval.judge import demo_shapes_config, load_judge, shapes_images
from qlip.transforms import image_transform

torch.manual_seed(0)
torch.set_num_threads(1)
CFG = demo_shapes_config()


def features(model, split, n):
    x, y = shapes_images(CFG, n, split=split, seed=0)
    t = image_transform(model.image_size, train=False)
    pixels = torch.stack([t(Image.fromarray(a)) for a in x.permute(0, 2, 3, 1).numpy()])
    with torch.no_grad():
        bits = model.encode(pixels, output="bits").flatten(1).float()
        last = model.encode_image_features(pixels, layer=-1).flatten(1)
    return {"token bits": bits, "last-block features": last}, y["shape"].long()


def linear_probe(a, ya, b, yb, steps=300):
    mean, std = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mean) / std, (b - mean) / std
    lin = torch.nn.Linear(a.shape[1], int(ya.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(lin(a), ya)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return round(100 * (lin(b).argmax(1) == yb).float().mean().item(), 1)


out = {"command": "python " + " ".join(sys.argv), "train_images": 6000, "test_images": 1000,
       "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "models": {}}
judge = load_judge("docs/results/judge")
for directory in sys.argv[2:]:
    start = time.perf_counter()
    model = qlip.create_model(directory).eval()
    train, ytr = features(model, "train", 6000)
    test, yte = features(model, "test", 1000)
    row = {name: linear_probe(train[name], ytr, test[name], yte) for name in train}
    row["judge on reconstructions"] = judge_ceiling(judge, CFG, num_images=1000, model=model)["judge_recon/shape"]
    row["seconds"] = round(time.perf_counter() - start, 1)
    out["models"][directory] = row
    print(directory, row, flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(out, f, indent=1)
