#!/usr/bin/env bash
# The runtime's checks on a GPU, from the built wheels in .whl/ (and a previous build in .whl-old/): the GPU test
# files beside an SDXL export (sdxl-random, 1024², --batch-size 4, the exporter's defaults but VAE max-autotune),
# then, one at a time while the tests go on: SDXL's load with this build's always-on artifact checks against the
# previous build's (and this build's load timeline), throughput and latency, the serving load test (fastdiff-serve
# against its own offline pipeline), a LoRA switch; the tests' result last (TESTS_DEADLINE s at most).
#   mkdir -p /tmp/r && (setsid nohup bash bench/gpu_checks.sh > /tmp/r/log 2>&1 < /dev/null &)
set -u
R=${R:-/tmp/r}
ART=/tmp/art/sdxl-b4
mkdir -p "$R" /tmp/art
export PYTHONUNBUFFERED=1 FASTDIFF_CACHE=/tmp/cache HF_HUB_OFFLINE=1
stamp() { echo "=== $(date +%T) $*"; }
install() { python3 -m pip install -q --no-index --no-deps --no-compile --target "$1" "${@:2}" || exit 1; }
install /tmp/site .whl/*.whl
install /tmp/site-old .whl-old/*.whl
export PYTHONPATH=/tmp/site
stamp "environment"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import torch, triton, diffusers; print(torch.__version__, torch.version.cuda, triton.__version__, diffusers.__version__)'

timeout "${TESTS_DEADLINE:-900}" python3 -m pytest -q -p no:cacheprovider -x \
  tests/test_gpu.py tests/test_weights.py tests/test_lora_gpu.py > "$R/gpu-tests.log" 2>&1 &
tests=$!
stamp "export sdxl-random"
python3 -c "import sys; from fastdiff.exporter.cli import main; sys.argv[0] = 'fastdiff-export'; main()" sdxl-random \
  --res 1024 --batch-size 4 --no-max-autotune --out "$ART" > "$R/export.log" 2>&1
grep -h "done in\|error" "$R/export.log" | tail -12
[[ -f $ART/manifest.json ]] || { stamp "no artifact"; exit 1; }
MODEL=$(python3 -c "from fastdiff.exporter.presets import PRESETS; print(PRESETS['sdxl-random'].build())" 2>/dev/null | tail -1)

stamp "load: this build against the previous one, alternating, fresh processes, page cache warm"
LOAD='import sys, time, torch; torch.zeros(1, device="cuda"); torch.cuda.synchronize()
from fastdiff.runtime import load_pipeline
t = time.perf_counter(); pipe = load_pipeline(sys.argv[1]); torch.cuda.synchronize()
print(f"{time.perf_counter() - t:.3f}")'
for run in 1 2 3 4; do
  for build in site site-old; do
    path=/tmp/$build; [[ $build == site-old ]] && path=/tmp/site-old:/tmp/site  # the old fastdiff, the same deps
    echo "$build $(PYTHONPATH=$path python3 -c "$LOAD" "$ART" 2>>"$R/load.err")" | tee -a "$R/load.txt"
  done
done
python3 bench/probe_load.py "$ART" > "$R/probe-load.txt" 2>&1; tail -25 "$R/probe-load.txt"
stamp "throughput"
python3 bench/throughput.py --artifact "$ART" --batches 1,2,4 --steps 20 --runs 3 --warmup 1 --out "$R/throughput-20"
python3 bench/throughput.py --artifact "$ART" --batches 1 --steps 30 --runs 3 --warmup 1 --out "$R/throughput-30"
stamp "serving"
python3 bench/serve_compare.py --artifact "$ART" --res 1024x1024 --steps 20 --concurrency 1,8 --requests 16 \
  --out "$R/serve-load" > "$R/serve-load.log" 2>&1; tail -12 "$R/serve-load.log"
stamp "LoRA"
python3 bench/lora_switch.py --model "$MODEL" --artifact "$ART" --baselines "" --out "$R/lora-switch" \
  > "$R/lora-switch.log" 2>&1; tail -15 "$R/lora-switch.log"
stamp "GPU tests"; wait "$tests"; tail -5 "$R/gpu-tests.log"
stamp "ALL DONE"
