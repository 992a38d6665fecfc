#!/usr/bin/env bash
# One whole GPU measurement session (H200 machine of the device tool): build a random-weight SDXL of the real
# architecture, export fastdiff artifacts in parallel, then the speed/quality and cold-start benchmarks.
# Run from the repo root, in the background:  setsid nohup bash bench/gpu_session.sh >/tmp/r/log 2>&1 &
# Results go to $R (default /tmp/r); copy them back as they appear.
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

stamp "smoke: tiny model on cuda, no LD_PRELOAD"
python3 -c "$EXPORT" tiny-sdxl --res 128 --device cuda --dtype bf16 --out /tmp/art/tiny > "$R/tiny-export.log" 2>&1
python3 -c 'import sys, torch; from fastdiff.runtime import load_pipeline
p = load_pipeline(sys.argv[1]); im = p("a cat", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
print("tiny cuda ok", im.size)' /tmp/art/tiny > "$R/tiny-run.log" 2>&1
rc=$?; echo "tiny run exit $rc"; tail -3 "$R/tiny-run.log"
if [ $rc -ne 0 ]; then
  export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6
  echo "tiny run failed without LD_PRELOAD; retrying with it"
  python3 -c 'import sys; from fastdiff.runtime import load_pipeline; load_pipeline(sys.argv[1]); print("ok with LD_PRELOAD")' /tmp/art/tiny
fi

stamp "building random SDXL (real architecture)"
MODEL=$(python3 -c 'from fastdiff.exporter.random_models import random_sdxl_base; print(random_sdxl_base())' 2>"$R/build.log" | tail -1)
echo "model at $MODEL"; du -sh "$MODEL"

stamp "exports in parallel"
python3 -c "$EXPORT" sdxl-random --res 1024 --device cuda --dtype bf16 --out /tmp/art/bf16 > "$R/export-bf16.log" 2>&1 &
python3 -c "$EXPORT" sdxl-random --res 1024 --device cuda --dtype bf16 --quantize fp8 --out /tmp/art/fp8 > "$R/export-fp8.log" 2>&1 &
python3 -c "$EXPORT" sdxl-random --res 1024 --device cuda --dtype bf16 --passes sdpa,fuse_qkv,conv1x1_to_linear,channels_last --seed-flags --out /tmp/art/seedflags > "$R/export-seedflags.log" 2>&1 &
wait
stamp "exports done"; grep -h "done in\|error" "$R"/export-*.log; du -sh /tmp/art/*

ARTS=""; for a in bf16 fp8 seedflags; do [ -f /tmp/art/$a/manifest.json ] && ARTS="$ARTS --artifact $a=/tmp/art/$a"; done
stamp "speed + quality"
python3 bench/speed.py --model "$MODEL" $ARTS --baselines eager,compile --compile-mode ${COMPILE_MODE:-reduce-overhead} --out "$R/speed" > "$R/speed.log" 2>&1
stamp "speed done"; cat "$R/speed.md"
stamp "cold start"
python3 bench/coldstart.py --model "$MODEL" --artifact bf16=/tmp/art/bf16 --out "$R/coldstart" > "$R/coldstart.log" 2>&1
stamp "cold start done"; cat "$R/coldstart.md"
stamp "ALL DONE"
