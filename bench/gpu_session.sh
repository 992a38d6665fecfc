#!/usr/bin/env bash
# One whole GPU measurement session (H200 machine of the device tool). Two phases: first every export the steps
# need, all at once (none is timed; they share the 16 cores), then the timed runs one at a time, in STEPS order.
# Compiles never run beside timed benchmarks: session B (bench/results/2026-11-30-h200-b) showed the baselines'
# wall times doubling when a compile shared the CPU. Steps (STEPS, space-separated):
#   sdxl               SDXL speed + quality + profile of the bf16 artifact (and sdxl-fp8's, if that step is on)
#                      against diffusers eager and torch.compile (SDXL_BASELINES; default mode), and
#                      profile-diff.md: the bf16 artifact against torch.compile kernel by kernel, with the Triton
#                      code of the kernels that differ most
#   sdxl-coldstart     process start -> first SDXL image: fastdiff (the same artifacts) and diffusers eager (page
#                      cache warm, then cold, each fastdiff run beside one without the prefetch, unless
#                      COLDSTART_OPTS says otherwise), then load_pipeline's phases for the last artifact (twice),
#                      and its warm-up's host time by op (probe-warmup.txt)
#   sdxl-compile-cold  the same for diffusers + torch.compile: cold, warm, then loaded compile-cache artifacts
#   sdxl-cudnn-benchmark  the sdxl step's artifacts again with torch.backends.cudnn.benchmark (convolutions: 4.7 ms
#                      of the UNet step, most of the VAE decode, on cuDNN's heuristic choices otherwise)
#   sdxl-seed          the seed's recipe (torch.compile max-autotune + its Inductor flags) and diffusers eager
#                      against the SDXL artifacts (bf16, and every SDXL variant's among the steps), all in one
#                      process (issue 3's benchmark: eager, recipe, artifacts in one run); its compile runs once in the
#                      export phase to fill Inductor's caches, so the timed run compiles from a warm cache
#   ssd-1b-seed, sd15-seed, pixart-seed  the same for SSD-1B, SD 1.5 (512²) and PixArt-α (issue 5); the families'
#                      cache-filling compiles run one after another (they benchmark on the GPU), in STEPS order
#   seed-fill          SDXL's cache-filling compile without the sdxl-seed step's second, timed process: it gathers
#                      the tuning results ($R/seed-tuning.tgz, progress in $R/seed-progress) and, if it finishes,
#                      times the recipe in its own process (seed-cache-fill-sdxl.md; beside the exports only if they
#                      outlast it: the timed steps wait for it)
#   ssd-1b             SSD-1B (SDXL pipeline, distilled UNet) at 1024², bf16, against eager and torch.compile
#   sd15               SD 1.5 at 512², bf16, against eager and torch.compile
#   pixart             PixArt-XL-2 at 1024², bf16, against eager and torch.compile
#   gpu-tests          the test files that need a GPU (GPU_TESTS), run with the exports
#   attention-probe    every SDPA backend on PixArt-α's and SDXL's own attention calls, shape by shape
#                      (probe-attention-FAMILY.md): what a per-call backend choice could gain
#   a VARIANTS name    an export with other options (below), speed + quality + profile of the artifact alone
# Every export's main-thread Python stack is appended to $R/stacks-NAME.txt each STACK_EVERY seconds (a SIGUSR1
# handler: unlike faulthandler's timed dump, which crashed an export in session C, it runs between bytecodes; ignored
# from exit on, when Python would otherwise restore the default action, which ends the process).
# Every export is bf16 without quantization unless its variant says otherwise (the CLI's auto picks fp8 for SDXL).
# sdxl-fp8-qkv and sdxl-fp8-qkv-ff add fp8 linears whose input quantization Inductor can fuse into the kernel before
# them (the self-attention QKV projection after its LayerNorm, the feed-forward output after GEGLU): measured alone
# (bench/results/2026-11-30-h200-e, probe-fp8.txt) their fp8 matmuls were 0.6 and 0.4 ms per step faster, and the
# separate quantization kernels lost more than that; in the UNet the feed-forward input projection's quantization
# was fused into its LayerNorm kernel (0.24 ms for 18 calls), so the other two may gain there.
# On the H200 every export's VAE decoder compiles with max-autotune (the exporter's default there since session L:
# 31.0 ms per decode against 34.9; the seed's recipe 27.7).
# Exports still running EXPORT_DEADLINE seconds after they started are stopped, and their steps skipped.
# SEED_GPU (a two-GPU machine): the seed steps (their cache-filling compiles, then their timed runs, once the artifacts
# are exported) run on that GPU and the CPUs SEED_CPUS, beside everything else on GPU MAIN_GPU and CPUs MAIN_CPUS;
# the compiles then have SEED_DEADLINE seconds instead of sharing the export phase's CPUs and deadline.
# The seed's compile from an empty cache takes longer than a session can give it (session I: 12 min benchmarking the
# UNet's 44 GEMMs and convolutions, alone on a GPU; session J: 23 min to the end with those cached), so its tuning
# results (Inductor's autotuning timings and coordinate-descent picks, kilobytes) are packed into $R/seed-tuning.tgz
# every minute; copied to SEED_TUNING (carried in: an ignored folder), a later session's compile restores them and
# benchmarks only what is still missing: the same kernels, chosen by the same benchmarks, on the same kind of GPU,
# image and versions (Inductor's cache keys check them). torch 2.11 tuned every restored pick again (session J);
# bench/inductor_fixes.py, which speed.py applies, makes it reuse them (session K: none tuned again, compile 167 s;
# seed-progress counts the picks a run writes). The seed's runs log dynamo's recompiles and Inductor's CUDA-graph
# skips (TORCH_LOGS=recompiles,cudagraphs): in session J the UNet compiled again on the pipeline's first call; in
# session K the recipe's UNet step took 38 ms of wall time for 32 ms of GPU work: were its CUDA graphs captured?
# Run from the repo root, in the background:  setsid nohup bash bench/gpu_session.sh >/tmp/r/log 2>&1 &
# and copy $R (default /tmp/r) back as results appear; "ALL DONE" ends the log.
# Seen on the H200 (session C, exports side by side): SDXL bf16 6 min, SD 1.5 4 min, PixArt 4.5 min. Session D: SDXL
# bf16 8 min beside a max-autotune SDXL export (unfinished after 14 min of AOTInductor compile: 45 ops autotuned,
# 5-9 s each) and the seed recipe's torch.compile (62 ops in 16 min). The autotune variants tune the matmuls only: in
# session D's export Triton won 25 of 27 of them but 6 of 18 convolutions, which took 31 % of the tuning. Session E,
# four exports side by side, all done in 13.5 min: SDXL UNet bf16 217 s, fp8 305 s, max-autotune (matmuls) 502 s.
# Session F (STEPS="gpu-tests sdxl sdxl-fp8 sdxl-coldstart sdxl-compile-cold", two compile baselines): exports 6.4 min,
# cold starts 3 min, speed 8 min, torch.compile's cold starts 5 min; 24 min in all from the call that started it.
# Session G (STEPS="gpu-tests sdxl sdxl-int8 sdxl-cudnn-benchmark sdxl-coldstart ssd-1b", one compile baseline):
# exports 8.2 min (int8's UNet 324 s), cold starts 2 min, sdxl 3.2 min, cudnn 0.6 min, ssd-1b 2.7 min; 18 min in all.
# Session L (STEPS="gpu-tests sdxl-fp8 sdxl-fp8-vae-autotune sdxl-seed sdxl-coldstart sd15-fp8 pixart-fp8
# sdxl-compile-cold"): exports 9.5 min but the GPU tests 11 min (the timed steps wait for them), sdxl-seed 2.6 min,
# cold starts 3.7 min, sd15-fp8 and pixart-fp8 1.5 min, torch.compile's cold starts 5.2 min; 25 min in all.
# Session M (STEPS="gpu-tests sdxl-fp8 sdxl-coldstart pixart-fp8 pixart-seed sd15-fp8 sd15-seed", deadlines 840 s):
# six exports 7-8.3 min, the GPU tests 13.7 min, PixArt-α's recipe compile 12 min from an empty cache (SD 1.5's then
# stopped by the deadline), pixart-seed 2.2 min, cold starts 3.9 min, sdxl-fp8 and sd15-fp8 1.5 min; 22 min in all.
# Session N (STEPS="gpu-tests sd15-seed ssd-1b-seed attention-probe sdxl-coldstart", deadlines 840 s): three exports
# 6.3-7.8 min, the GPU tests 12.5 min, SD 1.5's recipe compile (from session M's pack) stopped by the deadline after
# 32 more autotunings, then 8 min alone by hand: its UNet compiled, its coordinate descent (run at each kernel's first
# launch, in the CUDA graph's warm-up) still running; SSD-1B's never started. Cold starts 3.5 min, attention probes
# 1.8 min; 20 min in all.
# Session O (STEPS="ssd-1b-seed sd15-seed sdxl-coldstart", deadlines 960 s): three exports 5.9-7.4 min; SSD-1B's
# recipe compiled in 514 s from SDXL's tuning, SD 1.5's still in coordinate descent at the deadline (6 min); ssd-1b-seed
# 1.6 min, cold starts (warm and cold page cache) 5.8 min; 24 min in all.
# Session P (STEPS="gpu-tests sd15-seed", deadlines 1320 s, then R=/tmp/r2 STEPS=sdxl-coldstart COLDSTART_RUNS=2):
# SD 1.5's export 4.5 min, its recipe 11.5 min from session O's pack (81 picks, 12 convolutions autotuned again), the
# GPU tests 11.7 min beside them, sd15-seed 1.4 min; then SDXL's export 7 min and its cold starts under 5 min.
# Session Q (STEPS="gpu-tests sdxl-coldstart sdxl-compile-cold" COLDSTART_OPTS=--page-cache-cold
# COLDSTART_BYTECODE=/tmp/pyc): SDXL's export 10.7 min beside the GPU tests (13.5 min), cold starts 4.5 min with
# bytecode (the untimed runs write it), fastdiff's without bytecode and the load probes 0.8 min; the compile step's
# cold run (2.5 min) was all the device time left: give sdxl-compile-cold a session of its own.
# Session R (STEPS="sdxl-fp8 sdxl-coldstart sdxl-compile-cold" COLDSTART_OPTS="" COLDSTART_BYTECODE=/tmp/pyc): the
# bf16 and fp8 exports side by side 9.5 min, cold starts and probes 3.4 min, then the compile step's cold and warm
# runs 4.2 min; its third run was lost to a late poll (the machine is released 30 s after a call).
set -u
R=${R:-/tmp/r}
STEPS=${STEPS:-gpu-tests sdxl sdxl-coldstart sdxl-compile-cold sd15 pixart}
GPU_TESTS=${GPU_TESTS:-tests/test_weights.py tests/test_gpu.py}
STACK_EVERY=${STACK_EVERY:-60}
EXPORT_DEADLINE=${EXPORT_DEADLINE:-1500}
SDXL_BASELINES=${SDXL_BASELINES-eager,compile}  # speed.py --baselines for the sdxl step
FAMILY_BASELINES=${FAMILY_BASELINES-eager,compile}  # and for the ssd-1b, sd15 and pixart steps
COLDSTART_OPTS=${COLDSTART_OPTS---page-cache-cold --compare-prefetch}  # empty: page cache warm, prefetch only
COLDSTART_RUNS=${COLDSTART_RUNS:-3}  # fresh processes per variant (session K: 2 were too few for the machine's noise)
# COLDSTART_BYTECODE=DIR: the cold starts (and the load probes) read Python's bytecode from DIR, which their untimed
# runs write. This image sets PYTHONDONTWRITEBYTECODE and ships no bytecode (session Q): every process compiled
# torch's modules from source, as no pip install leaves them. The sdxl-coldstart step then also times fastdiff
# as the image has it (coldstart-image-bytecode.md), for the difference.
COLDSTART_BYTECODE=${COLDSTART_BYTECODE:-}
INDUCTOR_CACHE=${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor_$(whoami)}  # where profile-diff.md reads kernels' code
SEED_GPU=${SEED_GPU:-} MAIN_GPU=${MAIN_GPU:-0} SEED_CPUS=${SEED_CPUS:-16-31} MAIN_CPUS=${MAIN_CPUS:-0-15}
SEED_DEADLINE=${SEED_DEADLINE:-$EXPORT_DEADLINE}
SEED_TUNING=${SEED_TUNING:-.seed-tuning/seed-tuning.tgz}  # an earlier run's $R/seed-tuning.tgz, restored if present
mkdir -p "$R" /tmp/fd/fastdiff /tmp/art
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
prepare() {  # preset, artifact name, extra export options: build the random model, export it (stacks on SIGUSR1)
  local preset=$1 name=$2 model; shift 2
  model=$(build "$preset"); echo "$model" > "$R/model-$name"
  python3 -c "import atexit, signal, sys, traceback
signal.signal(signal.SIGUSR1, lambda s, frame: traceback.print_stack(frame, file=open('$R/stacks-$name.txt', 'a')))
atexit.register(signal.signal, signal.SIGUSR1, signal.SIG_IGN)  # Python resets its handlers to the default (exit)
from fastdiff.exporter.cli import main; sys.argv[0] = 'fastdiff-export'; main()" \
    "$preset" --device cuda --dtype bf16 --quantize none --out "/tmp/art/$name" --overwrite "$@" > "$R/export-$name.log" 2>&1
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
    fill=$!
    while kill -0 "$fill" 2> /dev/null; do
      sleep 5; (( SECONDS - packed >= 60 )) && { pack_seed_tuning; packed=$SECONDS; }
    done
    wait "$fill"; pack_seed_tuning
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
  for variant in $STEPS; do  # every variant of the family exported this session, in the same process as the recipe
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
{ want sdxl || want sdxl-coldstart || want sdxl-seed || want sdxl-cudnn-benchmark; } && { prepare sdxl-random sdxl-bf16 &
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
start=$SECONDS
while running && (( SECONDS - start < EXPORT_DEADLINE )); do
  sleep "$STACK_EVERY"; pkill -USR1 --older 5 -f -- "--out /tmp/art/"  # not while an interpreter starts
done
if running; then
  stamp "deadline: stopping the compiles still running"  # the seeds' own, on their own GPU, keep their SEED_DEADLINE
  touch "$R/exports-deadline"
  pkill -f -- "--out (/tmp/art/$([[ -z $SEED_GPU ]] && echo "|$R/seed-cache-fill"))"
fi
wait "${pids[@]}"
touch "$R/exports-done"

sdxl_artifacts=(--artifact sdxl-bf16=/tmp/art/sdxl-bf16)  # the default artifact (fp8 on this GPU) last
want sdxl-fp8 && [[ -f /tmp/art/sdxl-fp8/manifest.json ]] && sdxl_artifacts+=(--artifact sdxl-fp8=/tmp/art/sdxl-fp8)
if [[ -z $SEED_GPU ]]; then  # first: the measurements no session has made yet
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
if want sdxl-compile-cold; then  # right after fastdiff's cold starts, which it is the baseline of (session Q ran out
  # of device time before its warm-cache run when it came last; 5 min in session F)
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
