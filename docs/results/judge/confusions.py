"""The judge's shape confusions on 400 test reconstructions of a QLIP model, and a strip of the first 16 misread
images (top: original, bottom: reconstruction):

    python docs/results/judge/confusions.py MODEL_DIR OUT.png
"""

import sys
from collections import Counter

import numpy as np
import torch
from PIL import Image

import qlip
from qlip.eval import judge as J
from qlip.transforms import image_transform, to_uint8

judge = J.load_judge("docs/results/judge")
cfg = J.demo_shapes_config()
x, y = J.shapes_images(cfg, 400, split="test", seed=0)
columns = J.label_names(cfg, y)
truth = [{a: columns[a][i] for a in columns} for i in range(len(columns["shape"]))]
model = qlip.create_model(sys.argv[1]).eval()
tf = image_transform(model.image_size, train=False)
with torch.no_grad():
    batch = torch.stack([tf(Image.fromarray(a)) for a in x.permute(0, 2, 3, 1).numpy()])
    recon = to_uint8(model.reconstruct(batch))
pred = judge.predict(recon)
wrong = Counter((t["shape"], p["shape"]) for t, p in zip(truth, pred) if t["shape"] != p["shape"])
print(sum(wrong.values()), "wrong of", len(truth))
print(wrong.most_common(15))
bad = [i for i, (t, p) in enumerate(zip(truth, pred)) if t["shape"] != p["shape"]][:16]
tiles = [np.concatenate([x[i].permute(1, 2, 0).numpy(), recon[i].permute(1, 2, 0).numpy()], 0) for i in bad]
if tiles:
    Image.fromarray(np.concatenate(tiles, 1)).resize((64 * len(bad) * 3, 128 * 3), Image.NEAREST).save(sys.argv[2])
