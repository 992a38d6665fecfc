#!/usr/bin/env bash
# The runtime's checks on a GPU, from the built wheels in .whl/ (and a previous build in .whl-old/): the GPU test
# files beside an SDXL export (sdxl-random, 1024², --batch-size 4, the exporter's defaults but VAE max-autotune);
# then, on an otherwise idle GPU: SDXL's load with this build's always-on artifact checks against the previous
# build's (and this build's load timeline), a fine-tune's export with --packages-from, a LoRA switch beside
# diffusers' eager reload, the serving load test (fastdiff-serve and a diffusers server against the pipeline's offline
# numbers), replica start, and the LoRA switch beside torch.compile last (its recompiles take minutes).
#   mkdir -p /tmp/r && (setsid nohup bash bench/gpu_checks.sh > /tmp/r/log 2>&1 < /dev/null &)
set -u
R=${R:-/tmp/r}
ART=/tmp/art/sdxl-b4
mkdir -p "$R" /tmp/art
export PYTHONUNBUFFERED=1 FASTDIFF_CACHE=/tmp/cache HF_HUB_OFFLINE=1
stamp() { echo "=== $(date +%T) $*"; }
install() { python3 -m pip install -q --no-index --no-deps --no-compile --target "$1" "${@:2}" || exit 1; }
export_cli() { python3 -c "import sys; from fastdiff.exporter.cli import main; sys.argv[0] = 'fastdiff-export'; main()" "$@"; }
install /tmp/site .whl/*.whl
install /tmp/site-old .whl-old/*.whl
export PYTHONPATH=/tmp/site
stamp "environment"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import torch, triton, diffusers; print(torch.__version__, torch.version.cuda, triton.__version__, diffusers.__version__)'

tests=""  # GPU_TESTS=0: the measurements alone (a short device budget)
if [[ ${GPU_TESTS:-1} == 1 ]]; then
  timeout "${TESTS_DEADLINE:-300}" python3 -m pytest -q -p no:cacheprovider -rs \
    tests/test_gpu.py tests/test_weights.py tests/test_lora_gpu.py > "$R/gpu-tests.log" 2>&1 &
  tests=$!
fi
stamp "export sdxl-random"
# The packages compile in four worker processes (--jobs 4); one at a time if that fails.
export_cli sdxl-random --res 1024 --batch-size 4 --no-max-autotune --jobs 4 --out "$ART" > "$R/export.log" 2>&1 ||
  export_cli sdxl-random --res 1024 --batch-size 4 --no-max-autotune --out "$ART" >> "$R/export.log" 2>&1
grep -h "done in\|error" "$R/export.log" | tail -12
[[ -f $ART/manifest.json ]] || { stamp "no artifact"; exit 1; }
MODEL=$(python3 -c "from fastdiff.exporter.presets import PRESETS; print(PRESETS['sdxl-random'].build())" 2>/dev/null | tail -1)
if [[ -n $tests ]]; then
  stamp "GPU tests (the measurements wait for them: an idle GPU)"; wait "$tests"; echo "rc $?"; tail -4 "$R/gpu-tests.log"
fi

stamp "load: this build against the previous one, alternating, fresh processes, page cache warm"
LOAD='import sys, time, torch; torch.zeros(1, device="cuda"); torch.cuda.synchronize()
from fastdiff.runtime import load_pipeline
t = time.perf_counter(); pipe = load_pipeline(sys.argv[1]); torch.cuda.synchronize()
print(f"{time.perf_counter() - t:.3f}")'
for run in 1 2 3; do
  for build in site site-old; do
    path=/tmp/$build; [[ $build == site-old ]] && path=/tmp/site-old:/tmp/site  # the old fastdiff, the same deps
    echo "$build $(PYTHONPATH=$path python3 -c "$LOAD" "$ART" 2>>"$R/load.err")" | tee -a "$R/load.txt"
  done
done
python3 bench/probe_load.py "$ART" > "$R/probe-load.txt" 2>&1; tail -32 "$R/probe-load.txt"

stamp "fine-tune: --packages-from (the same random checkpoint, given as a folder)"
start=$(date +%s%N)
export_cli "$MODEL" --packages-from "$ART" --out /tmp/art/finetune > "$R/packages-from.log" 2>&1
echo "packages-from: rc $?, $(( ($(date +%s%N) - start) / 1000000 )) ms" | tee -a "$R/packages-from.log"
tail -4 "$R/packages-from.log"
python3 - /tmp/art/finetune "$ART" <<'PY' 2>&1 | tail -2
import sys, torch
from fastdiff.runtime import load_pipeline
def latents(path):
    return load_pipeline(path)("a fox", num_inference_steps=4, generator=torch.Generator("cuda").manual_seed(1),
                               output_type="latent").images
a, b = (latents(p) for p in sys.argv[1:])
print("fine-tune artifact's latents equal the source artifact's:", torch.equal(a, b))
PY

# The LoRA switch against diffusers' eager reload first, torch.compile's (minutes of recompiling) last.
stamp "LoRA"
python3 bench/lora_switch.py --model "$MODEL" --artifact "$ART" --baselines eager \
  --out "$R/lora-switch" > "$R/lora-switch.log" 2>&1; tail -20 "$R/lora-switch.log"
stamp "serving"
python3 bench/serve_compare.py --artifact "$ART" --model "$MODEL" --res 1024x1024 --steps 20 --concurrency 1,8 \
  --requests 16 --out "$R/serve-load" > "$R/serve-load.log" 2>&1; tail -16 "$R/serve-load.log"
stamp "replica start"
python3 bench/serve_start.py --artifact "$ART" --model "$MODEL" --res 1024 --runs 2 --out "$R/serve-start" \
  > "$R/serve-start.log" 2>&1; tail -8 "$R/serve-start.log"
stamp "LoRA, torch.compile baseline"
python3 bench/lora_switch.py --model "$MODEL" --artifact "$ART" --baselines compile \
  --out "$R/lora-switch-compile" > "$R/lora-switch-compile.log" 2>&1; tail -20 "$R/lora-switch-compile.log"
stamp "ALL DONE"
