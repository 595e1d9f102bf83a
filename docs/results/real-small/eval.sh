#!/bin/bash
# The held-out and training-subset evaluations behind docs/training.md "Small real sets" (2026-11-29).
# usage: bash docs/results/real-small/eval.sh RUN_DIR NAME   (writes docs/results/real-small/NAME/...)
# Runs: runs/openclipart-s (configs/real-small.yaml as committed, then named openclipart-s.yaml), runs/openclipart-s-recon
# (the same with loss.balance.weights.align=0), runs/openclipart-s-minilm (model.text_tower=hf:minilm
# data.tokenizer=null optim.lr_text=1e-3).
set -e
M=$1/last; O=docs/results/real-small/$2
qlip eval retrieval --model $M --data data/openclipart/heldout.csv --out $O/retrieval-heldout --device cpu --quiet
qlip eval retrieval --model $M --data data/openclipart/train.csv --limit 307 --out $O/retrieval-train --device cpu --quiet
qlip eval zero-shot --model $M --data data/openclipart/heldout.csv --label-column category --out $O/zero-shot-heldout \
    --device cpu --quiet
qlip eval recon --model $M --data data/openclipart/heldout.csv --out $O/recon-heldout --device cpu --quiet
qlip eval recon --model $M --data data/openclipart/train.csv --limit 307 --out $O/recon-train --device cpu --quiet
