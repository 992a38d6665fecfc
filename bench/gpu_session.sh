#!/usr/bin/env bash
# A whole measurement run on the GPU machine, in two phases: every export the steps need, all at once and untimed,
# then the timed steps one at a time, in STEPS order (a compile sharing the CPU with a timed run distorts its times).
# From the repository root, with the diffusers and torchao wheels in .whl/ (docs/benchmarks.md), in the background:
#   mkdir -p /tmp/r && (STEPS="sdxl-fp8 sdxl-coldstart" setsid nohup bash bench/gpu_session.sh \
#     > /tmp/r/log 2>&1 < /dev/null &)
# then copy $R back as results appear; "ALL DONE" ends the log.
#
# Steps (STEPS, space-separated):
#   gpu-tests          the test files that need a GPU (GPU_TESTS), run beside the exports
#   sdxl               the SDXL artifacts (bf16; fp8 too with sdxl-fp8) against SDXL_BASELINES: speed, quality against
#                      eager fp32, kernel profile; profile-diff.md compares the bf16 artifact with torch.compile
#   sdxl-coldstart     process start -> first SDXL image, fastdiff and diffusers eager (COLDSTART_OPTS), then
#                      load_pipeline's phases (probe-load.txt) and the warm-up's host time by op (probe-warmup.txt)
#   sdxl-compile-cold  the same cold start for diffusers + torch.compile: cold cache, warm cache, loaded cache artifacts
#   sdxl-cudnn-benchmark  the SDXL artifacts again with torch.backends.cudnn.benchmark on
#   sdxl-seed, ssd-1b-seed, sd15-seed, pixart-seed  diffusers eager, the seed's recipe (torch.compile max-autotune with
#                      its Inductor flags) and the family's artifacts in one process; the recipe first compiles in the
#                      export phase to fill Inductor's cache, so the timed process compiles from a warm one
#   seed-fill          SDXL's cache-filling recipe compile alone (its tuning packed into $R/seed-tuning.tgz)
#   ssd-1b, sd15, pixart  the family's bf16 artifact against FAMILY_BASELINES (SD 1.5 at 512², the others at 1024²)
#   attention-probe    every SDPA backend on PixArt-α's and SDXL's own attention calls (probe-attention-FAMILY.md)
#   sdxl-lora          a LoRA switch on SDXL (bench/lora_switch.py: the bf16 artifact, and the fp8 one with sdxl-fp8,
#                      against diffusers eager + fuse_lora and torch.compile's reload and hotswap), then the SDXL
#                      artifacts' packages reused by fastdiff-export --packages-from, timed (packages-from.txt)
#   a VARIANTS name    an export with other options (below), timed alone: speed, quality, profile
# Every export is bf16 and unquantized unless its variant says otherwise.
#
# Environment: R (results folder, default /tmp/r); EXPORT_DEADLINE (s: exports still running then are stopped and
# their steps skipped); SEED_DEADLINE (s, for the recipe's compiles); STACK_EVERY (s between dumps of each export's
# Python stack into $R/stacks-NAME.txt); SDXL_BASELINES, FAMILY_BASELINES (bench/speed.py --baselines);
# COLDSTART_OPTS, COLDSTART_RUNS (bench/coldstart.py's options and runs); COLDSTART_BYTECODE=DIR (cold starts read
# the bytecode their untimed runs cache in DIR, as a pip install leaves it, and fastdiff is also timed without);
# SEED_GPU, SEED_CPUS, MAIN_GPU, MAIN_CPUS (a two-GPU machine: the seed steps on their own GPU and CPUs, with their
# own deadline); SEED_TUNING (an earlier run's seed-tuning.tgz, restored first, so that the recipe's compile
# benchmarks only what that run did not reach).
set -u
R=${R:-/tmp/r}
STEPS=${STEPS:-gpu-tests sdxl sdxl-coldstart sdxl-compile-cold sd15 pixart}
GPU_TESTS=${GPU_TESTS:-tests/test_weights.py tests/test_gpu.py tests/test_lora_gpu.py}
STACK_EVERY=${STACK_EVERY:-60}
EXPORT_DEADLINE=${EXPORT_DEADLINE:-1500}
SDXL_BASELINES=${SDXL_BASELINES-eager,compile}  # speed.py --baselines for the sdxl step
FAMILY_BASELINES=${FAMILY_BASELINES-eager,compile}  # and for the ssd-1b, sd15 and pixart steps
COLDSTART_OPTS=${COLDSTART_OPTS---page-cache-cold --compare-prefetch}  # empty: page cache warm, prefetch only
COLDSTART_RUNS=${COLDSTART_RUNS:-3}  # fresh processes per variant: import times vary by seconds between processes
# The GPU image sets PYTHONDONTWRITEBYTECODE and ships no bytecode: without COLDSTART_BYTECODE every process compiles
# torch's modules from source, which no pip-installed environment does.
COLDSTART_BYTECODE=${COLDSTART_BYTECODE:-}
INDUCTOR_CACHE=${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor_$(whoami)}  # where profile-diff.md reads kernels' code
SEED_GPU=${SEED_GPU:-} MAIN_GPU=${MAIN_GPU:-0} SEED_CPUS=${SEED_CPUS:-16-31} MAIN_CPUS=${MAIN_CPUS:-0-15}
SEED_DEADLINE=${SEED_DEADLINE:-$EXPORT_DEADLINE}
SEED_TUNING=${SEED_TUNING:-.seed-tuning/seed-tuning.tgz}  # an earlier run's $R/seed-tuning.tgz, restored if present
mkdir -p "$R" /tmp/fd/fastdiff /tmp/art
PIDS=$(mktemp -d)  # the PIDs of the compiles this script starts, one file each, to signal or stop them
trap 'rm -rf "$PIDS"' EXIT
export PYTHONUNBUFFERED=1 FASTDIFF_CACHE=/tmp/cache HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
ln -sfn "$PWD/exporter" /tmp/fd/fastdiff/exporter
ln -sfn "$PWD/runtime" /tmp/fd/fastdiff/runtime
export PYTHONPATH=/tmp/fd:/tmp/site
declare -A VARIANTS=(
  [sdxl-fp8]="--quantize fp8" [sdxl-seedflags]="--seed-flags" [sdxl-attn-auto]="--attention auto"
  [sdxl-autotune]="--max-autotune --inductor-config max_autotune_conv_backends=ATEN" [sdxl-int8]="--quantize int8"
  [sdxl-conv1x1]="--passes sdpa,fuse_qkv,channels_last,conv1x1_to_linear"
  [sdxl-fp8-qkv]="--quantize fp8 --quantize-linears ff.net.0.proj,attn1.to_qkv"
  [sdxl-fp8-qkv-ff]="--quantize fp8 --quantize-linears ff.net.0.proj,attn1.to_qkv,ff.net.2"
  [sd15-fp8]="--quantize fp8" [pixart-fp8]="--quantize fp8"
  [sd15-autotune]="--max-autotune --inductor-config max_autotune_conv_backends=ATEN"
)
stamp() { echo "=== $(date +%T) $*"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
build() { python3 -c "from fastdiff.exporter.presets import PRESETS; print(PRESETS['$1'].build())" 2>"$R/build-$1.log" | tail -1; }
prepare() {  # preset, artifact name, extra export options: build the random model, export it (stacks on SIGUSR1:
  # a Python handler runs between bytecodes, where faulthandler's timed dump of another thread crashed an export)
  local preset=$1 name=$2 model pid; shift 2
  model=$(build "$preset"); echo "$model" > "$R/model-$name"
  python3 -c "import atexit, signal, sys, traceback
signal.signal(signal.SIGUSR1, lambda s, frame: traceback.print_stack(frame, file=open('$R/stacks-$name.txt', 'a')))
atexit.register(signal.signal, signal.SIGUSR1, signal.SIG_IGN)  # Python resets its handlers to the default (exit)
from fastdiff.exporter.cli import main; sys.argv[0] = 'fastdiff-export'; main()" \
    "$preset" --device cuda --dtype bf16 --quantize none --out "/tmp/art/$name" --overwrite "$@" > "$R/export-$name.log" 2>&1 &
  pid=$!; echo "$pid" > "$PIDS/export-$name"
  wait "$pid"; rm -f "$PIDS/export-$name"
  grep -h "done in\|error" "$R/export-$name.log"; stamp "export $name ended"
}
exported() { [[ -f /tmp/art/$1/manifest.json ]] || { stamp "skipping: no artifact $1"; return 1; }; }
model() { cat "$R/model-$1"; }
speed() {  # artifact name, baselines, extra options
  python3 bench/speed.py --model "$(model "$1")" --artifact "$1=/tmp/art/$1" --baselines "$2" --compile-mode default \
    --no-seed-flags --profile --out "$R/speed-$1" "${@:3}" > "$R/speed-$1.log" 2>&1
  grep -A8 "^| variant" "$R/speed-$1.md"
}

stamp "environment"; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit --format=csv
python3 -c 'import torch, triton, diffusers, torchao; print(torch.__version__, torch.version.cuda, triton.__version__, diffusers.__version__, torchao.__version__)'

SEED_FAMILIES=()  # whose recipe is compiled and timed against their artifacts, in STEPS order
for step in $STEPS; do [[ $step == *-seed ]] && SEED_FAMILIES+=("${step%-seed}"); done
fills=("${SEED_FAMILIES[@]}")
want seed-fill && [[ ${fills[0]:-} != sdxl ]] && fills=(sdxl "${fills[@]}")
res_of() { [[ $1 == sd15* ]] && echo --res 512; }  # a family's default resolution, as speed.py's option

pack_seed_tuning() {  # the seed compiles' tuning results so far: GEMM/convolution timings, coordinate-descent picks
  (cd "$INDUCTOR_CACHE" && find . -path ./cache -prune -o -name '*.best_config' -print \
    | tar czf "$R/seed-tuning.tgz.part" cache -T - && mv "$R/seed-tuning.tgz.part" "$R/seed-tuning.tgz") 2> /dev/null
  local tuned retuned; tuned=$(cat "$R"/seed-cache-fill-*.log 2> /dev/null | grep -c '^AUTOTUNE [a-z_]*(')
  retuned=$(find "$INDUCTOR_CACHE" -name '*.best_config' -newer "$R/seed-tuning-restored" 2> /dev/null | wc -l)
  echo "$(date +%T) $(tar tzf "$R/seed-tuning.tgz" 2> /dev/null | grep -c 'best_config$') coordinate-descent picks" \
    "(${retuned} written by this run), ${tuned:-0} GEMM/convolution autotunings" >> "$R/seed-progress"
}
seed_fill() {  # each family's recipe compiled in turn, then timed as its seed step's compile baseline is (own record)
  mkdir -p "$INDUCTOR_CACHE"
  [[ -f $SEED_TUNING ]] && tar xzf "$SEED_TUNING" -C "$INDUCTOR_CACHE" && stamp "seed tuning restored from $SEED_TUNING"
  touch "$R/seed-tuning-restored"  # picks newer than this were tuned by this run (none, if the cache was reused)
  local family fill packed=$SECONDS start=$SECONDS
  for family in "${fills[@]}"; do  # SEED_DEADLINE for them all; none started once the exports' deadline stopped one
    [[ -z $SEED_GPU && -f $R/exports-deadline ]] && break
    (( SECONDS - start < SEED_DEADLINE )) || { stamp "seed recipe for $family: no time left"; continue; }
    # shellcheck disable=SC2046  # res_of's option is words
    TORCH_LOGS=recompiles,cudagraphs timeout $(( SEED_DEADLINE - (SECONDS - start) )) python3 bench/speed.py \
      --model "$(build "$family-random")" $(res_of "$family") --baselines compile --no-reference --profile \
      --out "$R/seed-cache-fill-$family" > "$R/seed-cache-fill-$family.log" 2>&1 &
    fill=$!; echo "$fill" > "$PIDS/seed-fill"  # timeout's PID: it passes a SIGTERM on to the compile
    while kill -0 "$fill" 2> /dev/null; do
      sleep 5; (( SECONDS - packed >= 60 )) && { pack_seed_tuning; packed=$SECONDS; }
    done
    wait "$fill"; rm -f "$PIDS/seed-fill"; pack_seed_tuning
    [[ -f $R/seed-cache-fill-$family.json ]] && stamp "seed recipe for $family compiled (cache filled)"
  done
}
seed_time() {  # a family's recipe from its warm cache, and eager, against the family's artifacts exported
  local family=$1 variant
  exported "$family-bf16" || return
  if [[ ! -f $R/seed-cache-fill-$family.json ]]; then
    stamp "skipping $family-seed: the seed recipe's compile did not finish"; return
  fi
  stamp "$family: diffusers eager and the seed's recipe (warm compile cache) against the artifacts"
  local seed_artifacts=(--artifact "$family-bf16=/tmp/art/$family-bf16")
  for variant in $STEPS; do  # every variant of the family exported in this run, in the same process as the recipe
    [[ $variant == "$family"-* && -n ${VARIANTS[$variant]:-} && -f /tmp/art/$variant/manifest.json ]] \
      && seed_artifacts+=(--artifact "$variant=/tmp/art/$variant")
  done
  # the artifacts are timed first; a recipe compiling past SEED_DEADLINE is stopped (what was measured is kept)
  # shellcheck disable=SC2046  # res_of's option is words
  TORCH_LOGS=recompiles,cudagraphs timeout "$SEED_DEADLINE" python3 bench/speed.py --model "$(model "$family-bf16")" \
    $(res_of "$family") "${seed_artifacts[@]}" --baselines eager,compile --profile --out "$R/speed-$family-seed" \
    > "$R/speed-$family-seed.log" 2>&1
  grep -A8 "^| variant" "$R/speed-$family-seed.md"
}
if [[ -n $SEED_GPU ]] && (( ${#fills[@]} )); then  # beside the rest, on its own GPU and CPUs, from the start
  stamp "seed recipes (${fills[*]}) on GPU $SEED_GPU, CPUs $SEED_CPUS; the rest on GPU $MAIN_GPU, CPUs $MAIN_CPUS"
  ( export CUDA_VISIBLE_DEVICES=$SEED_GPU; taskset -cp "$SEED_CPUS" $BASHPID > /dev/null
    seed_fill; while [[ ! -f $R/exports-done ]]; do sleep 5; done
    for family in "${SEED_FAMILIES[@]}"; do seed_time "$family"; done ) &
  seed_job=$!
  export CUDA_VISIBLE_DEVICES=$MAIN_GPU; taskset -cp "$MAIN_CPUS" $$ > /dev/null
fi

stamp "exports, all at once"
pids=()
{ want sdxl || want sdxl-coldstart || want sdxl-seed || want sdxl-cudnn-benchmark || want sdxl-lora; } && {
  prepare sdxl-random sdxl-bf16 &
  pids+=($!); }
(( ${#fills[@]} )) && [[ -z $SEED_GPU ]] && { seed_fill & pids+=($!); }
{ want ssd-1b || want ssd-1b-seed; } && { prepare ssd-1b-random ssd-1b-bf16 & pids+=($!); }
{ want sd15 || want sd15-seed; } && { prepare sd15-random sd15-bf16 & pids+=($!); }
for variant in "${!VARIANTS[@]}"; do
  # shellcheck disable=SC2086  # the options are words
  want "$variant" && { prepare "${variant%%-*}-random" "$variant" ${VARIANTS[$variant]} & pids+=($!); }
done
{ want pixart || want pixart-seed; } && { prepare pixart-random pixart-bf16 & pids+=($!); }
want gpu-tests && { { python3 -m pytest -q -rs $GPU_TESTS > "$R/gpu-tests.log" 2>&1; tail -3 "$R/gpu-tests.log"; } &
  pids+=($!); }
running() { local pid; for pid in "${pids[@]}"; do kill -0 "$pid" 2> /dev/null && return; done; return 1; }
dump_stacks() {  # SIGUSR1 to each export older than 5 s: before its handler is installed the signal would end it
  local file pid
  for file in "$PIDS"/export-*; do
    [[ -f $file ]] || continue
    pid=$(< "$file")
    (( $(ps -o etimes= -p "$pid" 2> /dev/null || echo 0) >= 5 )) && kill -USR1 "$pid" 2> /dev/null
  done
}
stop_compiles() {  # SIGTERM to the exports, and to the recipe's compile unless it runs on its own GPU
  local file files=("$PIDS"/export-*)
  [[ -z $SEED_GPU ]] && files+=("$PIDS/seed-fill")
  for file in "${files[@]}"; do
    [[ -f $file ]] && kill "$(< "$file")" 2> /dev/null
  done
}
start=$SECONDS
while running && (( SECONDS - start < EXPORT_DEADLINE )); do
  sleep "$STACK_EVERY"; dump_stacks
done
if running; then
  stamp "deadline: stopping the compiles still running"  # the seeds' own, on their own GPU, keep their SEED_DEADLINE
  touch "$R/exports-deadline"
  stop_compiles
fi
wait "${pids[@]}"
touch "$R/exports-done"

sdxl_artifacts=(--artifact sdxl-bf16=/tmp/art/sdxl-bf16)  # the default artifact (fp8 on this GPU) last
want sdxl-fp8 && [[ -f /tmp/art/sdxl-fp8/manifest.json ]] && sdxl_artifacts+=(--artifact sdxl-fp8=/tmp/art/sdxl-fp8)
if [[ -z $SEED_GPU ]]; then  # first: the recipe's timings, the costliest to reach again if the run is cut short
  for family in "${SEED_FAMILIES[@]}"; do seed_time "$family"; done
fi
bytecode=(${COLDSTART_BYTECODE:+--bytecode-cache "$COLDSTART_BYTECODE"})
bytecode_env=(${COLDSTART_BYTECODE:+PYTHONPYCACHEPREFIX="$COLDSTART_BYTECODE" PYTHONDONTWRITEBYTECODE=})
if want sdxl-coldstart && exported sdxl-bf16; then
  stamp "sdxl: cold start (fastdiff, eager), then the runtime's load phases"
  # shellcheck disable=SC2086  # COLDSTART_OPTS is words
  python3 bench/coldstart.py --model "$(model sdxl-bf16)" "${sdxl_artifacts[@]}" --runs "$COLDSTART_RUNS" $COLDSTART_OPTS \
    "${bytecode[@]}" --out "$R/coldstart" > "$R/coldstart.log" 2>&1; cat "$R/coldstart.md"
  if [[ -n $COLDSTART_BYTECODE ]]; then
    python3 bench/coldstart.py "${sdxl_artifacts[@]}" --runs 2 --out "$R/coldstart-image-bytecode" \
      > "$R/coldstart-image-bytecode.log" 2>&1; cat "$R/coldstart-image-bytecode.md"
  fi
  probed=${sdxl_artifacts[-1]#*=}
  for _ in 1 2; do
    env "${bytecode_env[@]}" python3 bench/probe_load.py "$probed" >> "$R/probe-load.txt" 2>&1
  done
  cat "$R/probe-load.txt"
  python3 bench/probe_load.py "$probed" --profile-warmup 40 > "$R/probe-warmup.txt" 2>&1  # what the warm-up pays for
fi
if want sdxl-compile-cold; then  # right after fastdiff's cold starts, whose baseline it is (about 5 minutes)
  stamp "sdxl: cold start of torch.compile (cold, warm, then loaded compile cache)"
  python3 bench/coldstart.py --model "$(build sdxl-random)" --baselines compile "${bytecode[@]}" \
    --out "$R/coldstart-compile" > "$R/coldstart-compile.log" 2>&1; cat "$R/coldstart-compile.md"
fi
if want sdxl && exported sdxl-bf16; then
  stamp "sdxl: speed, quality, profile (artifacts against $SDXL_BASELINES)"
  python3 bench/speed.py --model "$(model sdxl-bf16)" "${sdxl_artifacts[@]}" --baselines "$SDXL_BASELINES" \
    --compile-mode default --no-seed-flags --profile --out "$R/speed-sdxl" > "$R/speed-sdxl.log" 2>&1
  grep -A8 "^| variant" "$R/speed-sdxl.md"
  for mode in reduce-overhead default; do  # where the bf16 artifact's GPU time differs from torch.compile's
    grep -q "torch.compile ($mode" "$R/speed-sdxl.md" && python3 bench/profile_diff.py "$R/speed-sdxl.json" \
      "fastdiff sdxl-bf16" "diffusers torch.compile ($mode" --sources "$INDUCTOR_CACHE" >> "$R/profile-diff.md" 2>&1
  done
fi
if want sdxl-cudnn-benchmark && exported sdxl-bf16; then
  stamp "sdxl: the artifacts again, with cuDNN timing its convolution algorithms"
  python3 bench/speed.py --model "$(model sdxl-bf16)" "${sdxl_artifacts[@]}" --baselines "" --cudnn-benchmark \
    --profile --no-reference --out "$R/speed-sdxl-cudnn-benchmark" > "$R/speed-sdxl-cudnn-benchmark.log" 2>&1
  grep -A4 "^| variant" "$R/speed-sdxl-cudnn-benchmark.md"
fi
if want sdxl-lora && exported sdxl-bf16; then
  stamp "sdxl: LoRA switch, fastdiff against diffusers eager and torch.compile"
  lora_fp8=()
  want sdxl-fp8 && [[ -f /tmp/art/sdxl-fp8/manifest.json ]] && lora_fp8=(--fp8-artifact /tmp/art/sdxl-fp8)
  python3 bench/lora_switch.py --model "$(model sdxl-bf16)" --artifact /tmp/art/sdxl-bf16 "${lora_fp8[@]}" \
    --out "$R/lora-switch" > "$R/lora-switch.log" 2>&1
  cat "$R/lora-switch.md"
  for name in sdxl-bf16 ${lora_fp8:+sdxl-fp8}; do  # a fine-tune's artifact from the SDXL artifact's packages
    stamp "sdxl: fastdiff-export --packages-from $name"
    begin=$EPOCHREALTIME
    python3 -c "import sys; from fastdiff.exporter.cli import main; sys.argv[0] = 'fastdiff-export'; main()" \
      sdxl-random --packages-from "/tmp/art/$name" --out "/tmp/art/$name-reused" --overwrite \
      > "$R/packages-from-$name.log" 2>&1
    status=$? took=$(python3 -c "print(f'{$EPOCHREALTIME - $begin:.1f}')")
    echo "$name: --packages-from ${took} s (exit $status); its full export:" \
      "$(grep -h "done in" "$R/export-$name.log" | tr '\n' ' ')" | tee -a "$R/packages-from.txt"
  done
fi
want ssd-1b && exported ssd-1b-bf16 && { stamp "ssd-1b: speed"; speed ssd-1b-bf16 "$FAMILY_BASELINES"; }
want sd15 && exported sd15-bf16 && { stamp "sd15: speed"; speed sd15-bf16 "$FAMILY_BASELINES" --res 512; }
for variant in $STEPS; do
  [[ -n ${VARIANTS[$variant]:-} ]] && exported "$variant" || continue
  grep -q "\"fastdiff $variant\"" "$R/speed-${variant%%-*}-seed.json" 2> /dev/null && continue  # beside the recipe
  [[ $variant == sdxl-fp8 && -f $R/speed-sdxl.json ]] && continue  # measured in the sdxl step
  stamp "$variant: speed"
  # shellcheck disable=SC2046  # res_of's option is words
  speed "$variant" "" $(res_of "$variant")
done
want pixart && exported pixart-bf16 && { stamp "pixart: speed"; speed pixart-bf16 "$FAMILY_BASELINES"; }
if want attention-probe; then
  for family in pixart sdxl; do
    stamp "$family: each attention backend on the denoiser's calls"
    python3 bench/probe_attention.py "$(build "$family-random")" > "$R/probe-attention-$family.md" \
      2> "$R/probe-attention-$family.log"
    cat "$R/probe-attention-$family.md"
  done
fi
[[ -n ${seed_job:-} ]] && { stamp "waiting for the seed recipes' steps"; wait "$seed_job"; }
stamp "ALL DONE"
