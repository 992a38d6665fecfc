#!/usr/bin/env bash
# One whole GPU measurement session (H200 machine of the device tool), most important numbers first: build a
# random-weight SDXL of the real architecture, export the default bf16 artifact, benchmark and profile it against
# diffusers eager and torch.compile while the fp8 variant exports on the other half of the CPU cores, then cold
# starts on a quiet machine, the fp8 benchmark, and torch.compile's cold starts (cold and warm compile cache).
# Run from the repo root, in the background:  setsid nohup bash bench/gpu_session.sh >/tmp/r/log 2>&1 &
# and copy $R (default /tmp/r) back as results appear; "ALL DONE" ends the log.
set -u
R=${R:-/tmp/r}
mkdir -p "$R" /tmp/fd/fastdiff /tmp/art
export PYTHONUNBUFFERED=1 FASTDIFF_CACHE=/tmp/cache HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
ln -sfn "$PWD/exporter" /tmp/fd/fastdiff/exporter
ln -sfn "$PWD/runtime" /tmp/fd/fastdiff/runtime
export PYTHONPATH=/tmp/fd:/tmp/site
EXPORT='import sys; from fastdiff.exporter.cli import main; sys.argv[0]="fastdiff-export"; main()'
NPROC=$(nproc); HALF=$((NPROC / 2))
stamp() { echo "=== $(date +%T) $*"; }

stamp "environment"; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit --format=csv
python3 -c 'import torch, triton, diffusers, torchao; print(torch.__version__, torch.version.cuda, triton.__version__, diffusers.__version__, torchao.__version__)'

stamp "building random SDXL (real architecture); meanwhile, does a cuDNN-attention package run under CUDA graphs?"
python3 - > "$R/cudnn-check.log" 2>&1 <<'PY' &
import torch, torch.nn.functional as F
from fastdiff.exporter.attention import attention_backend
from fastdiff.exporter.compile import compile_package, export_program
from fastdiff.runtime.packages import CompiledModule, CUDAGraphModule
class A(torch.nn.Module):
    def forward(self, q, k, v): return F.scaled_dot_product_attention(q, k, v) + 1
q, k, v = (torch.randn(2, 10, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
with attention_backend("cudnn"):
    compile_package(export_program(A(), (q, k, v), None), "/tmp/cudnn.pt2", {})
m = CUDAGraphModule(CompiledModule("/tmp/cudnn.pt2", {}, torch.device("cuda")))
out = m(q, k, v); out = m(q, k, v)
ref = A()(q.float(), k.float(), v.float())
print("CUDNN PACKAGE OK rel err", ((out.float() - ref).norm() / ref.norm()).item())
PY
CHECK=$!
MODEL=$(python3 -c 'from fastdiff.exporter.random_models import random_sdxl_base; print(random_sdxl_base())' 2>"$R/build.log" | tail -1)
echo "model at $MODEL"
wait $CHECK; tail -3 "$R/cudnn-check.log"
ATTENTION=auto; grep -q "CUDNN PACKAGE OK" "$R/cudnn-check.log" || ATTENTION=default

stamp "export bf16 (--attention $ATTENTION)"
python3 -c "$EXPORT" sdxl-random --device cuda --dtype bf16 --attention $ATTENTION --out /tmp/art/bf16 \
  > "$R/export-bf16.log" 2>&1
grep -h "attention for\|done in\|error" "$R/export-bf16.log"

stamp "export fp8 in the background, on cores $HALF-$((NPROC - 1))"
TORCHINDUCTOR_COMPILE_THREADS=$HALF taskset -c "$HALF-$((NPROC - 1))" python3 -c "$EXPORT" sdxl-random --device cuda \
  --dtype bf16 --quantize fp8 --attention $ATTENTION --out /tmp/art/fp8 > "$R/export-fp8.log" 2>&1 &
FP8=$!

stamp "speed + quality + profile (bf16 artifact, eager, torch.compile default mode), on cores 0-$((HALF - 1))"
TORCHINDUCTOR_COMPILE_THREADS=$HALF taskset -c "0-$((HALF - 1))" python3 bench/speed.py --model "$MODEL" \
  --artifact bf16=/tmp/art/bf16 --baselines eager,compile --compile-mode default --no-seed-flags --profile \
  --out "$R/speed-bf16" > "$R/speed-bf16.log" 2>&1
grep -A12 "^| variant" "$R/speed-bf16.md"

stamp "waiting for the fp8 export"; wait $FP8
grep -h "attention for\|done in\|error" "$R/export-fp8.log"

stamp "cold start (quiet machine)"
python3 bench/coldstart.py --model "$MODEL" --artifact bf16=/tmp/art/bf16 --runs 2 --out "$R/coldstart" > "$R/coldstart.log" 2>&1
cat "$R/coldstart.md"
python3 bench/probe_load.py /tmp/art/bf16 > "$R/probe-load.txt" 2>&1; cat "$R/probe-load.txt"

stamp "speed + quality + profile (fp8 artifact)"
python3 bench/speed.py --model "$MODEL" --artifact fp8=/tmp/art/fp8 --baselines "" --profile --out "$R/speed-fp8" \
  > "$R/speed-fp8.log" 2>&1
grep -A6 "^| variant" "$R/speed-fp8.md"

stamp "cold start of torch.compile (cold, then warm compile cache)"
python3 bench/coldstart.py --model "$MODEL" --baselines compile --out "$R/coldstart-compile" > "$R/coldstart-compile.log" 2>&1
cat "$R/coldstart-compile.md"
stamp "ALL DONE"
