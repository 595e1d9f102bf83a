#!/usr/bin/env bash
# The sampling settings of the text-to-image demo, chosen on the VAL split's held-out captions (200, seed 0):
#   bash docs/results/t2i/sampling-val/sweep.sh runs/t2i-shapes/last [OUT_DIR]
# writes OUT_DIR (default docs/results/t2i/sampling-val)/T<temperature>-cfg<guidance>/report.{json,md} and summary.tsv.
set -euo pipefail
model=${1:-runs/t2i-shapes/last}
here=${2:-docs/results/t2i/sampling-val}
mkdir -p "$here"
printf 'temperature\tguidance\tshape\tcolor\tposition\tall\n' > "$here/summary.tsv.tmp"
for setting in "1.0 3" "0.7 3" "0.5 3" "0.3 3" "0.3 1.5" "0.3 2" "0.3 2.5" "0.1 2" "0.5 2" "0.5 4" "0.7 2" "1.0 5"; do
  set -- $setting
  out="$here/T$1-cfg$2"
  qlip eval generation --model "$model" --judge docs/results/judge --split val --temperature "$1" --cfg "$2" \
      --out "$out" > /dev/null
  python - "$out/report.json" "$1" "$2" >> "$here/summary.tsv.tmp" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["metrics"]
print("\t".join([sys.argv[2], sys.argv[3]] + [f"{m['gen/' + k]:.1f}" for k in ("shape", "color", "position", "all")]))
PY
done
mv "$here/summary.tsv.tmp" "$here/summary.tsv"
cat "$here/summary.tsv"
