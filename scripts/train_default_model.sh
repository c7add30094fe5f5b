#!/usr/bin/env bash
# Reproduce the shipped default model (chiptune_forge/models/default):
#   1. build the dataset from the VGMIDI corpus (if not built yet);
#   2. compare a few hparams settings, each trained for the same wall-clock time, by eval loss;
#   3. train the best one for TRAIN_SECONDS (the first argument; default 5400), checkpointing, evaluating
#      and exporting every CHECKPOINT_EVERY steps, so stopping it early (Ctrl-C or kill -INT on the
#      trainer) still leaves a complete model;
#   4. export the run into the package with a model card rendered from the run's recorded numbers.
# Running it again resumes the training run where it stopped (delete runs/default to start over).
# Environment: CORPUS, DATA, RUNS, SWEEP_SECONDS, CHECKPOINT_EVERY, MAX_LENGTH, CF (the chiptune-forge command).
set -euo pipefail
cd "$(dirname "$0")/.."

CF=${CF:-.venv/bin/chiptune-forge}
CORPUS=${CORPUS:-../shared/corpus/vgmidi}
DATA=${DATA:-data/vgmidi}
RUNS=${RUNS:-runs}
SWEEP_SECONDS=${SWEEP_SECONDS:-150}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-100}
MAX_LENGTH=${MAX_LENGTH:-512}
TRAIN_SECONDS=${1:-5400}
RUN="$RUNS/default"
CANDIDATES=(
    "batch_size=64,rnn_layer_sizes=[128,128,128]"
    "batch_size=64,rnn_layer_sizes=[256,256]"
    "batch_size=32,rnn_layer_sizes=[128,128,128]"
    "batch_size=64,rnn_layer_sizes=[64,64,64]"
)

[ -f "$DATA/summary.json" ] || "$CF" dataset --input-dir "$CORPUS" --output-dir "$DATA"

if [ ! -f "$RUN/hparams.json" ]; then
    for i in "${!CANDIDATES[@]}"; do
        sweep="$RUNS/sweep-$i"
        if [ ! -f "$sweep/export/model.json" ]; then
            rm -rf "$sweep"
            # SIGINT at the deadline: the trainer evaluates, checkpoints and exports, then exits.
            timeout -s INT -k 300 "$SWEEP_SECONDS" "$CF" train --run-dir "$sweep" --dataset "$DATA" \
                --hparams "${CANDIDATES[$i]}" --max-length "$MAX_LENGTH" --checkpoint-every 1000000 --eval || true
        fi
    done
    mkdir -p "$RUN"
    best=$(.venv/bin/python - "$RUNS" "$SWEEP_SECONDS" "$RUN/selection.md" "${#CANDIDATES[@]}" <<'EOF'
import json, sys
runs, seconds, out, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rows = []
for i in range(count):
    d = json.load(open(f"{runs}/sweep-{i}/export/model.json"))
    hp = d["hparams"]
    rows.append((d["eval"]["loss"], d["eval"]["accuracy"], d["training_steps"],
                 f"batch_size={hp['batch_size']},rnn_layer_sizes=[{','.join(map(str, hp['rnn_layer_sizes']))}]"))
rows.sort()
lines = [f"Each candidate trained for {seconds} s of wall-clock time on the same machine (the default model's "
         "training is limited by time, not steps), then scored on the eval split; lowest eval loss wins.", "",
         "| hparams | steps | eval loss | eval accuracy |", "|---|---|---|---|"]
lines += [f"| `{h}` | {s} | {loss:.4f} | {acc:.4f} |" for loss, acc, s, h in rows]
open(out, "w").write("\n".join(lines) + "\n")
print(rows[0][3])
EOF
)
    echo "selected: $best"
    HPARAMS=(--hparams "$best")
else
    HPARAMS=()
fi

timeout -s INT -k 600 "$TRAIN_SECONDS" "$CF" train --run-dir "$RUN" --dataset "$DATA" "${HPARAMS[@]}" \
    --max-length "$MAX_LENGTH" --checkpoint-every "$CHECKPOINT_EVERY" --eval || true
"$CF" export --run-dir "$RUN" --output-dir chiptune_forge/models/default --model-card
