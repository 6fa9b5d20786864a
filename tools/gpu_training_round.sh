#!/bin/bash
# One training round on a lent GPU machine inside a fixed wall-clock budget:
#   1. generate fresh phantom training series in parallel (one tools/make_dataset.py per process, each its own seed),
#   2. merge them into one dataset folder,
#   3. train, side by side on the one GPU: the teacher (from --init), and students distilled from the committed
#      teacher (from the committed student), each with tools/*.py --device cuda --time-budget,
#   4. write float16 release copies (tools/release_checkpoint.py) and the logs to OUT.
# Evaluation is not done here: the released checkpoints are evaluated on the CPU like any other.
#
#   OUT=/tmp/out BUDGET=540 GEN_PROCS=16 PER_PROC=36 WHEELS=.dev/gpuwheels bash tools/gpu_training_round.sh
#
# On the lent H200 (16 cores) generating 576 series took 196 s and decoding them 35 s; the loops ran at 48 ms
# (teacher) and 55 ms (student) per step side by side. The machine there lacks pydicom and onnx-graphsurgeon
# (tools/distill.py and tools/release_checkpoint.py read checkpoints through the exporter): carry their wheels.
#
# Environment: OUT (results), BUDGET (seconds for the whole script), GEN_PROCS, PER_PROC, SEED0 (first dataset
# seed; process i uses SEED0 + i), DEVICE (cuda; cpu for a dry run), WHEELS (folder of wheels to install first,
# e.g. pydicom where the machine lacks it), PY (python), TEACHER_LR (5e-4; "none" trains no teacher),
# STUDENT_LRS (one student per learning rate, named student_a, student_b, ...: "5e-4 1e-3"), STUDENT_INITS (the
# checkpoint each of those students starts from, in the same order, e.g. freshly pruned ones; default: every one
# from models/student/student.pt).
set -uo pipefail
cd "$(dirname "$0")/.." && export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s)
: "${OUT:?set OUT}" "${BUDGET:=540}" "${GEN_PROCS:=16}" "${PER_PROC:=36}" "${SEED0:=1000}" "${DEVICE:=cuda}"
: "${PY:=python3}" "${VAL_SERIES:=8}" "${STEPS:=40000}" "${CACHE_WORKERS:=8}"
read -r -a LRS <<< "${STUDENT_LRS:-5e-4 1e-3}"
read -r -a INITS <<< "${STUDENT_INITS:-}"
if [ ${#INITS[@]} -eq 0 ]; then for _ in "${LRS[@]}"; do INITS+=(models/student/student.pt); done; fi
if [ ${#INITS[@]} -ne ${#LRS[@]} ]; then
    echo "STUDENT_INITS names ${#INITS[@]} checkpoints for ${#LRS[@]} learning rates in STUDENT_LRS"; exit 1
fi
for f in "${INITS[@]}"; do [ -f "$f" ] || { echo "student checkpoint not found: $f"; exit 1; }; done
W=${WORK:-/tmp/gpu_round}
rm -rf "$W" && mkdir -p "$W/gen" "$W/data/train" "$OUT"
left() { echo $((BUDGET - ($(date +%s) - T0))); }
log() { echo "[$(($(date +%s) - T0)) s] $*"; }

if [ -n "${WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import torch, pydicom, cv2, onnx_graphsurgeon; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

log "generating $GEN_PROCS x $PER_PROC training series + $VAL_SERIES validation series"
for i in $(seq 1 "$GEN_PROCS"); do
    $PY tools/make_dataset.py --out "$W/gen/g$i" --train "$PER_PROC" --val 0 --test 0 --seed $((SEED0 + i)) \
        --slices 48 --no-localizer > "$W/gen_g$i.log" 2>&1 &
done
$PY tools/make_dataset.py --out "$W/gen/v" --train 0 --val "$VAL_SERIES" --test 0 --seed "$SEED0" --slices 48 \
    --no-localizer > "$W/gen_v.log" 2>&1 &
wait
for i in $(seq 1 "$GEN_PROCS"); do
    if [ ! -f "$W/gen/g$i/train/annotations.csv" ]; then echo "generator $i failed:"; tail -5 "$W/gen_g$i.log"; exit 1; fi
    mv "$W/gen/g$i/train" "$W/data/train/g$i"
done
mv "$W/gen/v/val" "$W/data/val" || exit 1
for t in annotations.csv annotations_meta.csv series.csv; do
    head -n 1 "$W/data/train/g1/$t" > "$W/data/train/$t"
    for i in $(seq 1 "$GEN_PROCS"); do tail -n +2 "$W/data/train/g$i/$t" >> "$W/data/train/$t"; done
done
log "dataset: $(($(wc -l < "$W/data/train/series.csv") - 1)) training series, \
$(($(wc -l < "$W/data/train/annotations.csv") - 1)) nodules"

# Caching (decoding the series) comes before the training loop; the loops share what is left, less the release.
TRAIN_BUDGET=$(($(left) - ${CACHE_S:-75} - 30))
KILL_AFTER=$(($(left) - 20))
log "training loops: ${TRAIN_BUDGET} s each, side by side"
COMMON=(--data "$W/data" --device "$DEVICE" --time-budget "$TRAIN_BUDGET" --cache-workers "$CACHE_WORKERS"
        --steps "$STEPS" --threads 2 --positive-sampling nodule --no-progress)
MODELS=()
if [ "${TEACHER_LR:-5e-4}" != none ]; then
    timeout "$KILL_AFTER" $PY tools/train_teacher.py "${COMMON[@]}" --out "$W/teacher" --init models/teacher/teacher.pt \
        --lr "${TEACHER_LR:-5e-4}" --seed 7 > "$W/teacher.log" 2>&1 &
    MODELS+=(teacher)
fi
LETTERS=(a b c d e f g h) i=0
for lr in "${LRS[@]}"; do
    m=student_${LETTERS[$i]} init=${INITS[$i]}; i=$((i + 1))
    timeout "$KILL_AFTER" $PY tools/distill.py "${COMMON[@]}" --out "$W/$m" --student "$init" \
        --teacher models/teacher/teacher.pt --lr "$lr" --seed $((7 + i)) > "$W/$m.log" 2>&1 &
    MODELS+=("$m")
done
wait
log "training done"
for m in "${MODELS[@]}"; do
    tail -n 3 "$W/$m.log"
    [ -f "$W/$m/last.pt" ] && $PY tools/release_checkpoint.py --checkpoint "$W/$m/last.pt" --out "$OUT/$m.pt"
done
tar czf "$OUT/logs.tgz" -C "$W" --exclude='*.pt' --exclude=data --exclude=gen . 2>/dev/null
log "done"
