#!/usr/bin/env bash
# One whole GPU measurement session (H200 machine of the device tool). Two phases: first every export, all at once
# (none is timed; they share the 16 cores), then the timed runs one at a time, most important first. Compiles never
# run beside timed benchmarks: session B (bench/results/2026-11-30-h200-b) showed the baselines' wall times doubling
# when a compile shared the CPU. Steps, each skipped unless named in STEPS (default: all):
#   sdxl      random SDXL, bf16 export with the default passes, speed + quality + profile against diffusers eager
#             and torch.compile, cold starts (fastdiff, eager, torch.compile cold and warm compile cache)
#   fp8stack  the fp8 SDXL export with Python stacks of every thread dumped each FP8_STACK_EVERY seconds (where does
#             its compile time go?); stopped when the timed phase begins
#   fp8       the fp8 export to the end, then its speed
#   sd15      random SD 1.5 at 512², export and speed against eager and torch.compile
#   pixart    random PixArt-XL-2 at 1024², export and speed against eager and torch.compile
# Run from the repo root, in the background:  setsid nohup bash bench/gpu_session.sh >/tmp/r/log 2>&1 &
# and copy $R (default /tmp/r) back as results appear; "ALL DONE" ends the log.
# Seen on the H200: SDXL bf16 export ~6 min (UNet AOTInductor 217 s, text encoders 56 s); the fp8 export's UNet
# compile had not finished after 18.5 min on 8 cores.
set -u
R=${R:-/tmp/r}
STEPS=${STEPS:-sdxl sd15 pixart fp8stack}
mkdir -p "$R" /tmp/fd/fastdiff /tmp/art
export PYTHONUNBUFFERED=1 FASTDIFF_CACHE=/tmp/cache HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
ln -sfn "$PWD/exporter" /tmp/fd/fastdiff/exporter
ln -sfn "$PWD/runtime" /tmp/fd/fastdiff/runtime
export PYTHONPATH=/tmp/fd:/tmp/site
EXPORT='import sys; from fastdiff.exporter.cli import main; sys.argv[0]="fastdiff-export"; main()'
stamp() { echo "=== $(date +%T) $*"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
build() { python3 -c "from fastdiff.exporter.presets import PRESETS; print(PRESETS['$1'].build())" 2>"$R/build-$1.log" | tail -1; }
export_model() {  # preset, artifact name, extra export options
  local preset=$1 name=$2; shift 2
  python3 -c "$EXPORT" "$preset" --device cuda --dtype bf16 --out "/tmp/art/$name" --overwrite "$@" \
    > "$R/export-$name.log" 2>&1
  grep -h "done in\|error" "$R/export-$name.log"
}
speed() {  # model, artifact name, baselines, extra options
  python3 bench/speed.py --model "$1" --artifact "$2=/tmp/art/$2" --baselines "$3" --compile-mode default \
    --no-seed-flags --profile --out "$R/speed-$2" "${@:4}" > "$R/speed-$2.log" 2>&1
  grep -A8 "^| variant" "$R/speed-$2.md"
}

stamp "environment"; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit --format=csv
python3 -c 'import torch, triton, diffusers, torchao; print(torch.__version__, torch.version.cuda, triton.__version__, diffusers.__version__, torchao.__version__)'

prepare() {  # preset, artifact name, extra export options: build the random model, export it
  local model; model=$(build "$1"); echo "$model" > "$R/model-$2"
  export_model "$@"; stamp "exported $2"
}
model() { cat "$R/model-$1"; }

stamp "exports, all at once"
want sdxl && prepare sdxl-random sdxl-bf16 &
want sd15 && prepare sd15-random sd15-bf16 &
want pixart && prepare pixart-random pixart-bf16 &
want fp8 && prepare sdxl-random sdxl-fp8 --quantize fp8 &
if want fp8stack; then
  EXPORT="import faulthandler, sys; faulthandler.dump_traceback_later(${FP8_STACK_EVERY:-60}, repeat=True, file=open('$R/fp8-stacks.txt', 'w')); $EXPORT" \
    prepare sdxl-random sdxl-fp8stack --quantize fp8 &
  STACK_PID=$!
fi
for job in $(jobs -p); do [[ $job == "${STACK_PID:-}" ]] || wait "$job"; done
if [[ -n ${STACK_PID:-} ]]; then
  stamp "stopping the fp8 export (its stacks are in fp8-stacks.txt)"; pkill -f "sdxl-fp8stack"; wait "$STACK_PID"
fi

if want sdxl; then
  SDXL=$(model sdxl-bf16)
  stamp "sdxl: speed, quality, profile (eager, torch.compile default mode)"; speed "$SDXL" sdxl-bf16 eager,compile
  stamp "sdxl: cold start (fastdiff, eager), then the runtime's load phases"
  python3 bench/coldstart.py --model "$SDXL" --artifact bf16=/tmp/art/sdxl-bf16 --runs 2 --out "$R/coldstart" \
    > "$R/coldstart.log" 2>&1; cat "$R/coldstart.md"
  python3 bench/probe_load.py /tmp/art/sdxl-bf16 > "$R/probe-load.txt" 2>&1; cat "$R/probe-load.txt"
  stamp "sdxl: cold start of torch.compile (cold, then warm compile cache)"
  python3 bench/coldstart.py --model "$SDXL" --baselines compile --out "$R/coldstart-compile" \
    > "$R/coldstart-compile.log" 2>&1; cat "$R/coldstart-compile.md"
fi
want sd15 && { stamp "sd15: speed"; speed "$(model sd15-bf16)" sd15-bf16 eager,compile --res 512; }
want pixart && { stamp "pixart: speed"; speed "$(model pixart-bf16)" pixart-bf16 eager,compile; }
want fp8 && { stamp "fp8: speed, quality, profile"; speed "$(model sdxl-fp8)" sdxl-fp8 ""; }
stamp "ALL DONE"
