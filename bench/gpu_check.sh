#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step functions are called indirectly, by run_step
# bench/gpu_check.sh — fewstep's GPU check: every GPU figure bench/RESULTS.md waits for, in one run of about
# 9 minutes on one H100/H200, written in RESULTS.md form.
#
#   bench/gpu_check.sh                   GPU: the steps below, each with its own time budget, 540 s in all
#   bench/gpu_check.sh --dry             CPU: every step at tiny sizes (smoke flags, collect-only tests), to prove
#                                        that the script starts and every command line is valid (GPU_CHECK_DRY=1 too)
#   bench/gpu_check.sh --only kernels,train,sample   rerun some steps (setup always runs; sample needs train)
#   bench/gpu_check.sh --prepare-wheels  here, with network: fill .whl/ with what the device image lacks
#
# Steps (GPU budget in seconds; a step that overruns is stopped and the next one starts). They run in the order
# setup, diagnose, kernel_tests, train, sample, sample_tests, kernels, train_step (open questions first):
#   setup         35  install .whl/ into $WORK/site (never touching the image's CUDA torch), put this checkout's
#                     fewstep first on PYTHONPATH, record device, driver and versions
#   diagnose     110  bench/cuda_diagnose.py: bisects the first GPU check's CUDA-only failures (TwinFlow training
#                     non-finite at step 1; CUDA bf16 sampling far from CPU fp32): torch's bf16 vs fp32 CPU normals,
#                     pipeline parity cpu/cuda fp32/bf16, then 3 training steps per suspect (the same run on the CPU,
#                     cuDNN / math-only attention, fused kernels, overlap_comm, fp32, adversarial, EMA, ...; none
#                     if the stock config trains; its table is rewritten per row, and variants stop in time)
#   kernel_tests  70  pytest tests/kernels on CUDA (Triton kernels against their torch references)
#   kernels       70  bench/kernels.py at 256M elements: GB/s vs copy bandwidth, against eager and
#                     torch.compile (rows print as they finish: a cut-short step keeps them)
#   train_step    90  bench/train_step.py: Qwen-Image, 8 blocks at real width, 1024², TwinFlow LoRA r64 (s/step,
#                     MFU, peak memory, share outside transformer calls); TwinFlow at 512², batch 4, teacher passes
#                     on the used rows vs the whole batch (paired); then the flow-matching peer anchor
#   train         45  launcher/train.py: 20-step TwinFlow LoRA (bf16, EMA, adversarial branch, fused kernels) on
#                     tiny:flux, or GPU_CHECK_TRAIN_MODEL (a diffusers folder of family GPU_CHECK_TRAIN_FAMILY);
#                     if the diagnosis found this config non-finite and one change that trains, with that change
#   sample        40  launcher/sample.py on that LoRA at 1 and 2 NFE (cuda, bf16, one untimed warm-up), then
#                     1 NFE with --offload model and --offload sequential
#   sample_tests  80  pytest tests/test_sample_cli.py's CUDA test (cuda bf16 vs cpu fp32, both offloads; it trains
#                     its own two tiny runs), a TwinFlow micro-step under torch's CUDA sync debug mode "error",
#                     the teacher swap from pinned host memory into bf16 shards in pieces (offload_optimizer's path),
#                     and masked attention's backward on pytorch#196678's inputs (models/attention.py)
#
# Outputs under $OUT (the device tool's output folder; default output/gpu_check, output/gpu_check-dry for --dry):
# summary.md (RESULTS.md form: device, date, command, every figure; rewritten after each step, so a run cut short
# still leaves one), gpu_check.json (the same, machine-readable), kernels.md (bench/kernels.py's table), steps.log
# (every step's output). Paste summary.md into bench/RESULTS.md.
#
# Preparing .whl/ (here, once; the device machine reaches no registry). Its image has CUDA torch, triton,
# accelerate, huggingface_hub, safetensors, tokenizers, tensorboard, numpy, pillow, tqdm, einops, msgpack, ninja,
# psutil, py-cpuinfo; it lacks diffusers and deepspeed (and pydantic, hjson for deepspeed). The wheels pin this
# repo's versions (transformers, peft, filelock, regex too: transformers 5.24 checks regex's version at import):
#     bench/gpu_check.sh --prepare-wheels          # about 26 MB; .whl/ is in .gitignore and travels only if carried
# It runs `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux...` for each pinned
# wheel and builds deepspeed (an sdist on PyPI) as a pure-Python wheel with DS_BUILD_OPS=0.
#
# The device call (one call; the machine start is not in timeout_s; 540 s budget + summary leaves ~50 s spare):
#     run(command="GPU_CHECK_COMMIT=<git rev-parse --short HEAD> bash bench/gpu_check.sh", carry=[".whl"],
#         timeout_s=600)
# then copy files_at/summary.md into bench/RESULTS.md. To rerun a step that failed, e.g. after a fix:
#     run(command="bash bench/gpu_check.sh --only kernels", carry=[".whl"], timeout_s=300)
#
# Environment: GPU_CHECK_BUDGET_S (540; dry 600, and 3x each step's budget), GPU_CHECK_PYTHON (python3),
# GPU_CHECK_TRAIN_MODEL/_FAMILY, GPU_CHECK_KEEP=1 (keep the work folder: step logs, the trained LoRA, samples).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${GPU_CHECK_PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
ONLY=""
COMMAND="bench/gpu_check.sh $*"
PINS=(diffusers==0.42.1 transformers==5.24.0 peft==0.21.2 filelock==4.3.2 regex==2026.5.9 pydantic==2.13.4
      pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0 hjson==3.1.0)
DEEPSPEED=deepspeed==0.19.8

prepare_wheels() {
    rm -rf .whl && mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PINS[@]}"
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$DEEPSPEED"
    ls -l .whl && du -sh .whl
}

while (($#)); do
    case $1 in
        --dry) DRY=1 ;;
        --only) ONLY=${2:?--only needs a comma-separated list of steps}; shift ;;
        --prepare-wheels) prepare_wheels; exit 0 ;;
        -h|--help) sed -n '3,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ $DRY == 1 ]]; then
    MODE=dry OUT=${OUT:-$REPO/output/gpu_check-dry} BUDGET=${GPU_CHECK_BUDGET_S:-600} SCALE=3  # CPUs are slower
else
    MODE=gpu OUT=${OUT:-$REPO/output/gpu_check} BUDGET=${GPU_CHECK_BUDGET_S:-540} SCALE=1
fi
DEADLINE=$((SECONDS + BUDGET))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
if [[ ${GPU_CHECK_KEEP:-0} != 1 ]]; then trap 'rm -rf "$WORK"' EXIT; fi
SITE=$WORK/site
LOG=$OUT/steps.log
mkdir -p "$OUT"
: >"$LOG"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
if [[ $MODE == dry ]]; then export DS_ACCELERATOR=cpu; fi
TRAIN_MODEL=${GPU_CHECK_TRAIN_MODEL:-tiny:flux}
TRAIN_FAMILY=${GPU_CHECK_TRAIN_FAMILY:-flux}
echo "gpu_check: mode $MODE, budget ${BUDGET}s, work $WORK, out $OUT"

summarize() {
    "$PY" bench/gpu_check_summary.py --work "$WORK" --out "$OUT" --mode "$MODE" --command "$COMMAND" ||
        echo "gpu_check: summary failed" >&2
}

tmo() {  # run a command within what is left of the current step's budget
    local left=$((STEP_DEADLINE - SECONDS))
    if ((left <= 0)); then return 124; fi
    timeout -k 10 "$left" "$@"
}

FAILED=0
STATUS=""
run_step() {  # name budget_s function: run it in a subshell with set -e, log it, record STATUS, time, FAILED
    # (never call it after || or in an if: bash would then ignore set -e inside the step)
    local name=$1 budget=$(($2 * SCALE)) fn=$3 rc t0 status
    STATUS=skipped
    if [[ -n $ONLY && $name != setup && ",$ONLY," != *",$name,"* ]]; then return 0; fi
    local left=$((DEADLINE - SECONDS))
    local t=$((budget < left ? budget : left))
    if ((t < 10)); then
        printf '%s\tskipped (no time left)\t0\t%s\t%s\n' "$name" "$budget" "$fn" >>"$WORK/steps.tsv"
        summarize
        return 0
    fi
    STEP_DEADLINE=$((SECONDS + t))
    echo "== $name (up to ${t}s)" | tee -a "$LOG"
    t0=$SECONDS
    set +e
    (set -e; "$fn") >"$WORK/$name.log" 2>&1
    rc=$?
    set -e
    case $rc in
        0) status=ok ;;
        124|137) status="timed out after ${t}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    cat "$WORK/$name.log" >>"$LOG"
    echo "== $name: $status in $((SECONDS - t0))s" | tee -a "$LOG"
    if [[ $status != ok ]]; then tail -n 25 "$WORK/$name.log"; FAILED=1; fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$budget" "$fn" >>"$WORK/steps.tsv"
    STATUS=$status
    summarize
}

step_setup() {
    mkdir -p "$SITE"
    if [[ $MODE == gpu ]] && compgen -G ".whl/*.whl" >/dev/null; then
        tmo "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .whl/*.whl
    elif [[ $MODE == gpu ]]; then
        echo "no .whl/ here: using the installed packages (see the header for --prepare-wheels)"
    else
        echo "dry: would run: $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade" \
            "--target $SITE .whl/*.whl"
        if compgen -G ".whl/*.whl" >/dev/null; then ls .whl; fi
    fi
    # this checkout's fewstep (src/fewstep, and kernels/ as fewstep.kernels), first on PYTHONPATH
    rm -rf "$SITE/fewstep" && cp -r src/fewstep "$SITE/fewstep" && cp -r kernels "$SITE/fewstep/kernels"
    find "$SITE/fewstep" -name __pycache__ -prune -exec rm -rf {} +
    local commit
    commit=${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}  # the device's copy may
    if [[ -z ${GPU_CHECK_COMMIT:-} && -n $(git status --porcelain 2>/dev/null | head -1) ]]; then  # lack .git
        commit="$commit (with uncommitted changes)"
    fi
    GPU_CHECK_COMMIT=$commit GPU_CHECK_MODE=$MODE tmo "$PY" - "$WORK/env.json" "$SITE" <<'EOF'
import datetime, importlib, json, os, subprocess, sys

import torch

import fewstep

assert fewstep.__file__.startswith(sys.argv[2]), f"fewstep imported from {fewstep.__file__}, not the copy"
versions = {"python": sys.version.split()[0]}
for name in ("torch", "triton", "diffusers", "deepspeed", "transformers", "peft", "accelerate"):
    versions[name] = importlib.import_module(name).__version__
env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
       "commit": os.environ["GPU_CHECK_COMMIT"], "versions": versions, "cuda": torch.version.cuda}
if torch.cuda.is_available():
    env["device"] = torch.cuda.get_device_name()
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
    except OSError:
        pass
elif os.environ["GPU_CHECK_MODE"] == "gpu":
    sys.exit("gpu_check: torch sees no CUDA GPU; on a CPU use --dry")
else:
    env["device"] = "cpu (dry run: no GPU)"
print(json.dumps(env, indent=1))
with open(sys.argv[1], "w") as fh:
    json.dump(env, fh)
EOF
}

step_diagnose() {  # the CUDA-only training NaN and sampling mismatch of the first GPU check (2026-12-04)
    local args=(--deadline-s $((STEP_DEADLINE - SECONDS - 10))) rc=0
    if [[ $MODE == dry ]]; then args+=(--variants 1); fi
    tmo "$PY" bench/cuda_diagnose.py --out "$WORK/diagnose" "${args[@]}" || rc=$?
    cp "$WORK/diagnose/diagnose.md" "$WORK/diagnose.md" || true  # rewritten per row: a step cut short keeps its rows
    return "$rc"
}

step_kernel_tests() {
    if [[ $MODE == dry ]]; then
        tmo "$PY" -m pytest -q -p no:cacheprovider --collect-only tests/kernels
    else
        tmo "$PY" -m pytest -q -p no:cacheprovider -rfE tests/kernels
    fi
}

step_kernels() {
    local sizes=(256M) size args=()  # 256M fits the budget (2026-12-04: 64M did not finish within it too)
    if [[ $MODE == dry ]]; then sizes=(2K) args=(--interpret-smoke --ema-tensors 8); fi
    : >"$WORK/kernels.md"
    for size in "${sizes[@]}"; do
        tmo "$PY" bench/kernels.py "${args[@]}" --sizes "$size" | tee -a "$WORK/kernels.md"
        cp "$WORK/kernels.md" "$OUT/kernels.md"
    done
}

step_train_step() {
    local smoke=()
    if [[ $MODE == dry ]]; then smoke=(--smoke); fi
    local run json args runs=(twinflow used_b4 all_b4 flow)
    # TwinFlow and the flow-matching peer anchor at 1024², batch 1; then TwinFlow at 512², batch 4 with its teacher
    # passes on the used rows (the default) and on the whole batch (the reference's way), a paired comparison (same
    # groups and times; at batch 1 a rank with no used row still runs one, so the comparison needs batch >= 2)
    if [[ $MODE == dry ]]; then runs=(all_b4 flow); fi  # every flag the four pass (SDXL's smoke: tests/bench)
    for run in "${runs[@]}"; do
        case $run in
            twinflow) json=$WORK/train_step.json args=(--method twinflow --resolution 1024 --batch 1) ;;
            flow) json=$WORK/train_step_flow.json args=(--method flow --resolution 1024 --batch 1) ;;
            used_b4) json=$WORK/train_step_used_rows.json args=(--method twinflow --resolution 512 --batch 4) ;;
            all_b4) json=$WORK/train_step_all_rows.json
                    args=(--method twinflow --resolution 512 --batch 4 --teacher_rows all) ;;
        esac
        tmo "$PY" bench/train_step.py --family qwen_image --depth 8 "${args[@]}" \
            --lora_rank 64 --warmup 2 --steps 3 --json "$json" "${smoke[@]}"
    done
}

step_train() {
    local steps=20
    if [[ $MODE == dry ]]; then steps=2; fi
    cat >"$WORK/train_config.json" <<EOF
{"model_family": "$TRAIN_FAMILY", "model_type": "lora", "pretrained_model_name_or_path": "$TRAIN_MODEL",
 "data_backend_config": "configs/demo/multidatabackend.json", "output_dir": "$WORK/train",
 "use_ema": true, "ema_decay": 0.99, "twinflow_enabled": true, "twinflow_target_step_count": 2,
 "twinflow_adversarial_enabled": true, "learning_rate": 1e-3, "lora_rank": 8, "train_batch_size": 4,
 "gradient_accumulation_steps": 1, "max_train_steps": $steps, "mixed_precision": "bf16",
 "checkpointing_steps": 0, "validation_steps": 0, "validation_guidance": 0.0, "report_to": "none"}
EOF
    local fix=$WORK/diagnose/fix.json  # the diagnosis found the stock config non-finite and this change trains
    if [[ -f $fix ]]; then
        echo "train: the diagnosis found a change that trains on this GPU; training with it: $(cat "$fix")"
        tmo "$PY" bench/cuda_diagnose.py --train "$WORK/train_config.json" --fix "$fix"
    else
        tmo "$PY" launcher/train.py --config "$WORK/train_config.json"
    fi
}

step_sample() {
    local method=twinflow  # a diagnosis fix may have turned TwinFlow off (bench/cuda_diagnose.py's fix.json)
    if grep -qs '"twinflow_enabled": false' "$WORK/diagnose/fix.json"; then method=flow; fi
    local common=(launcher/sample.py --method "$method" --lora "$WORK/train" --prompt "a red circle" --seed 0)
    tmo "$PY" "${common[@]}" --steps 1 2 --warmup 1 --output "$WORK/sample.png" --json "$WORK/sample.json"
    local mode
    for mode in model sequential; do
        tmo "$PY" "${common[@]}" --steps 1 --warmup 1 --offload "$mode" --output "$WORK/sample_$mode.png" \
            --json "$WORK/sample_offload_$mode.json"
    done
}

step_sample_tests() {
    local collect=()
    if [[ $MODE == dry ]]; then collect=(--collect-only); fi
    tmo "$PY" -m pytest -q -p no:cacheprovider -rfEs "${collect[@]}" \
        tests/test_sample_cli.py::test_cuda_bf16_sampling_with_and_without_offload \
        tests/test_twinflow_step.py::test_a_micro_step_never_synchronises_on_cuda \
        tests/engine/test_engine_config.py::test_swap_from_pinned_host_memory_into_device_shards_on_cuda \
        tests/models/test_attention.py::test_the_masked_attention_bug_is_avoided_on_cuda
}

# Budgets add up to BUDGET (540 s; tests/bench/test_gpu_check_dry.py checks): measured on the H200 on 2026-12-04
# (setup 26 s, kernel tests 56 s, train 29 s, kernels at 256M about 60 s, a train_step run about 37 s)
run_step setup 35 step_setup
if [[ $STATUS != ok ]]; then echo "gpu_check: setup failed, nothing else can run" >&2; exit 1; fi
# what the last GPU run left open first; kernels and train_step have recorded figures (bench/RESULTS.md)
run_step diagnose 110 step_diagnose
run_step kernel_tests 70 step_kernel_tests
run_step train 45 step_train
run_step sample 40 step_sample
run_step sample_tests 80 step_sample_tests
run_step kernels 70 step_kernels
run_step train_step 90 step_train_step
echo "gpu_check: $MODE run done in ${SECONDS}s; summary in $OUT/summary.md"
cat "$OUT/summary.md"
exit "$FAILED"
