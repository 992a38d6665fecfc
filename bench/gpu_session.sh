#!/usr/bin/env bash
# One whole GPU measurement session (H200 machine of the device tool), most important numbers first: build a
# random-weight SDXL of the real architecture, export the default bf16 artifact, benchmark it against diffusers
# (speed, quality, cold start), then export and benchmark the fp8 variant.
# Run from the repo root, in the background:  setsid nohup bash bench/gpu_session.sh >/tmp/r/log 2>&1 &
# and copy $R (default /tmp/r) back as results appear.
# Seen on 2026-11-30: the bf16 SDXL export takes ~4 minutes; fp8 and --seed-flags exports run in parallel with
# two others had not finished after 9 minutes, so exports run one at a time here.
set -u
R=${R:-/tmp/r}
mkdir -p "$R" /tmp/fd/fastdiff /tmp/art
export PYTHONUNBUFFERED=1 FASTDIFF_CACHE=/tmp/cache HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
ln -sfn "$PWD/exporter" /tmp/fd/fastdiff/exporter
ln -sfn "$PWD/runtime" /tmp/fd/fastdiff/runtime
export PYTHONPATH=/tmp/fd:/tmp/site
EXPORT='import sys; from fastdiff.exporter.cli import main; sys.argv[0]="fastdiff-export"; main()'
stamp() { echo "=== $(date +%T) $*"; }

stamp "environment"; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit --format=csv
python3 -c 'import torch, triton, diffusers, torchao; print(torch.__version__, torch.version.cuda, triton.__version__, diffusers.__version__, torchao.__version__)'

stamp "building random SDXL (real architecture)"
MODEL=$(python3 -c 'from fastdiff.exporter.random_models import random_sdxl_base; print(random_sdxl_base())' 2>"$R/build.log" | tail -1)
echo "model at $MODEL"

stamp "export bf16"
python3 -c "$EXPORT" sdxl-random --device cuda --dtype bf16 --out /tmp/art/bf16 > "$R/export-bf16.log" 2>&1
grep -h "done in\|error" "$R/export-bf16.log"

stamp "speed + quality (bf16 artifact, eager, torch.compile ${COMPILE_MODE:-default} without the seed flags)"
python3 bench/speed.py --model "$MODEL" --artifact bf16=/tmp/art/bf16 --baselines eager,compile \
  --compile-mode "${COMPILE_MODE:-default}" --no-seed-flags --out "$R/speed-bf16" > "$R/speed-bf16.log" 2>&1
cat "$R/speed-bf16.md"

stamp "cold start"
python3 bench/coldstart.py --model "$MODEL" --artifact bf16=/tmp/art/bf16 --out "$R/coldstart" > "$R/coldstart.log" 2>&1
cat "$R/coldstart.md"

stamp "export fp8"
python3 -c "$EXPORT" sdxl-random --device cuda --dtype bf16 --quantize fp8 --out /tmp/art/fp8 > "$R/export-fp8.log" 2>&1
grep -h "done in\|error" "$R/export-fp8.log"
stamp "speed + quality (fp8 artifact)"
python3 bench/speed.py --model "$MODEL" --artifact fp8=/tmp/art/fp8 --baselines "" --out "$R/speed-fp8" > "$R/speed-fp8.log" 2>&1
cat "$R/speed-fp8.md"
stamp "ALL DONE"
