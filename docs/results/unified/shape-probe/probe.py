"""How a shape can be read from QLIP tokens: classifiers of the shape over features of a `qlip tokenize` folder.

    python docs/results/unified/shape-probe/probe.py data/shapes-tok docs/results/unified/shape-probe/probe.json

Each token's bits (as +-1) are the features; the classifiers see them with or without where each token is:
``slot x bits`` (a linear map of all 64 x 20 bits: each bit at each place has its own weight), ``mean bits`` (the
mean over the grid of the tokens' bits: no place), ``sub-token counts`` (how often each of the 2 x 1,024 sub-codes
occurs: a bag of ids, what attention without positions pools). Trained with Adam (lr 1e-3, batch 32, 10 epochs)
on the first 25,000 images, scored on the rest; ``slot x bits`` is also scored after 1 and 2 epochs.
"""

from __future__ import annotations

import json
import re
import sys

import torch
import torch.nn.functional as F

from qlip.data.shapes import DEFAULT_SHAPES
from qlip.generation.codec import split_tokens
from qlip.quantizers.bsq import bits_to_codes, indices_to_bits
from qlip.train.tasks.generator import read_token_folder


def main(folder: str, out: str) -> None:
    torch.manual_seed(0)
    tokens, captions, spec = read_token_folder(folder)
    labels = torch.tensor([next(i for i, s in enumerate(DEFAULT_SHAPES) if re.search(rf"\b{s}\b", c))
                           for c in captions])  # fmt: skip
    flat = tokens.flatten(1).long()
    bits = bits_to_codes(indices_to_bits(flat, spec.bits), scale=False)  # (N, grid^2, bits) as +-1
    sub = split_tokens(flat, spec.bits, 2) + torch.tensor([0, 1 << (spec.bits // 2)])  # (N, grid^2, 2)
    counts = torch.zeros(len(flat), 2 << (spec.bits // 2)).scatter_add_(
        1, sub.flatten(1), torch.ones(sub.flatten(1).shape)
    )
    n_train = 25_000
    result = {"folder": folder, "images": len(flat), "train": n_train, "shapes": list(DEFAULT_SHAPES), "accuracy": {}}

    def fit(name: str, x: torch.Tensor, epochs: int = 10, report: tuple[int, ...] = ()) -> None:
        model = torch.nn.Linear(x.shape[1], len(DEFAULT_SHAPES))
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for epoch in range(1, epochs + 1):
            for idx in torch.randperm(n_train).split(32):
                loss = F.cross_entropy(model(x[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if epoch in report or epoch == epochs:
                with torch.no_grad():
                    acc = (model(x[n_train:]).argmax(-1) == labels[n_train:]).float().mean().item()
                key = name if epoch == epochs else f"{name} after {epoch} epoch{'s' if epoch > 1 else ''}"
                result["accuracy"][key] = round(100 * acc, 1)
                print(f"{key}: {100 * acc:.1f}%")

    fit("slot x bits", bits.flatten(1), report=(1, 2))
    fit("mean bits", bits.mean(1))
    fit("sub-token counts", counts / flat.shape[1])
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
