#!/usr/bin/env bash
# One GPU session: correctness against the CPU, the training entry point on CUDA (bf16, resume, torchrun) and the
# sampling / tokenizing speed figures. Every part has its own time limit, so one that hangs costs only its share.
#
#   OUT=gpu-out bash benchmarks/gpu_session.sh
#
# Needs a trained demo generator and its inputs at the paths configs/t2i-shapes.yaml names
# (runs/t2i-shapes/last, runs/shapes-tiny-stage2/last, data/shapes-tok) and python3 with torch + CUDA; qlip is
# taken from src/ (no install). $OUT receives summary.txt and gpu-session.tgz (every log, JSON file and report),
# refreshed after each part, so a session cut short still returns what it did.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
R=$(mktemp -d)  # the session's files, packed into $OUT/gpu-session.tgz
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu TRAIN_STEPS=10 tries the script itself on a machine without a GPU
TRAIN_STEPS=${TRAIN_STEPS:-300}
QLIP="$PY -m qlip.cli"
SUMMARY="$R/summary.txt"
G=$(mktemp -d)  # the run directories of this session
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
DEADLINE=${DEADLINE:-480}  # seconds for the whole session: a part gets at most what is left of it
part() {  # part NAME SECONDS COMMAND...: run with a limit, log to $R/NAME.log, record exit code and wall time
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS left=$((DEADLINE - SECONDS))
    if ((left < 20)); then
        note "part $name: skipped (the session's $DEADLINE s are spent)"
        return 0
    fi
    ((limit > left)) && limit=$left
    timeout "$limit" "$@" >"$R/$name.log" 2>&1
    local rc=$?
    note "part $name: exit $rc in $((SECONDS - t0)) s"
    tail -n 25 "$R/$name.log"
    pack
    return 0
}

pack() {
    cp "$SUMMARY" "$OUT/summary.txt"
    tar czf "$OUT/gpu-session.tgz.part" -C "$R" . && mv "$OUT/gpu-session.tgz.part" "$OUT/gpu-session.tgz"
}

note "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
note "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
note "torch: $($PY -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>&1)"
note "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x $(nproc)"

# 1. Correctness against the CPU (tokenizer codes, generator loss / hidden states, KV cache = recomputation).
part check 150 $PY benchmarks/gpu_check.py --device $DEVICE --generator runs/t2i-shapes/last --out "$R/gpu_check.json"

# 2. The training entry point on CUDA: precision auto (= bf16 autocast), the demo generator's config.
T2I="configs/t2i-shapes.yaml optim.warmup_steps=5 eval.at_end=false checkpoint.export=false logging.every=10"
part train-cuda 150 $QLIP train $T2I distributed.device=$DEVICE optim.steps=$TRAIN_STEPS checkpoint.every=$TRAIN_STEPS run_dir=$G/a
grep -o '"samples_per_s": [0-9.]*' $G/a/metrics.jsonl | tail -n 3 | tee -a "$SUMMARY"

# 3. Exact resume on CUDA: 40 steps straight vs 20 + resume 20 (and a second straight run: is CUDA deterministic?).
part resume-whole 90 $QLIP train $T2I logging.every=1 distributed.device=$DEVICE optim.steps=40 run_dir=$G/w1
part resume-again 90 $QLIP train $T2I logging.every=1 distributed.device=$DEVICE optim.steps=40 run_dir=$G/w2
part resume-part1 90 $QLIP train $T2I logging.every=1 distributed.device=$DEVICE optim.steps=40 stop_at=20 checkpoint.every=20 \
    run_dir=$G/p
part resume-part2 90 $QLIP train $T2I logging.every=1 distributed.device=$DEVICE optim.steps=40 checkpoint.every=20 run_dir=$G/p
$PY - "$G" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import sys
from qlip.train.logger import read_metrics
runs = {k: [r["loss/image_tokens"] for r in read_metrics(f"{sys.argv[1]}/{k}") if "loss/image_tokens" in r]
        for k in ("w1", "w2", "p")}
print("resume: logged losses", {k: len(v) for k, v in runs.items()})
print("resume: straight twice identical:", runs["w1"] == runs["w2"], "| straight == stopped+resumed:", runs["w1"] == runs["p"])
print("resume: max |diff| straight vs resumed:", max((abs(a - b) for a, b in zip(runs["w1"], runs["p"])), default=None))
EOF

# 4. torchrun on the one GPU (NCCL, DDP) and FSDP2.
part torchrun-ddp 120 $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m qlip.cli train $T2I \
    optim.steps=30 run_dir=$G/ddp
part torchrun-fsdp 120 $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m qlip.cli train $T2I \
    optim.steps=30 distributed.strategy=fsdp run_dir=$G/fsdp

# 5. ShapesEval of the demo generator sampled on the GPU (the CPU figure: docs/results/t2i/gradient-1800-t03/).
part eval-generation 150 $QLIP eval generation --model runs/t2i-shapes/last --temperature 0.3 --cfg 2.5 \
    --device $DEVICE --out "$R/eval-generation"

# 6. Speed: sampling (docs/benchmarks.md section 8) and tokenizing (section 1), on the GPU.
part bench-sampling 200 $PY benchmarks/bench_sampling.py --device $DEVICE --demo-images 256 --b-images 64 \
    --b-reference-images 4 --repeats 5 --b-repeats 3 --out "$R/sampling-cuda.json"
part bench-tokenize 200 $PY benchmarks/bench_tokenize.py --device $DEVICE --models QLIP-B-16-256 \
    --batch-sizes 1,64,256 --variants reference,fp32,bf16 --repeats 10 --out "$R/tokenize-cuda-B16.json"
note "done: $(date -u '+%H:%M:%S UTC')"
pack
