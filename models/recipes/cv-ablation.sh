#!/usr/bin/env bash
# The cross-validated ablation of benchmarks/RESULTS.md (issue 14): the default recipe with one
# thing changed per row, each row 5-fold cross-validated over the 1,500 shared pairs
# ('lookalike train --cv 5': every pair validated once, mean ± standard error over the folds).
# Rows share one feature cache of all 3,000 images, so a row that changes only the head's
# training costs minutes. A row already done (or half done) resumes per fold.
# Run from the repository root:  bash models/recipes/cv-ablation.sh [ROW ...]
set -euo pipefail
LOOKALIKE=${LOOKALIKE:-.venv/bin/lookalike}
OUT=${OUT:-data/train/cv}
RECIPE=models/recipes/default.toml

declare -A ROWS=(
  [default]=""
  [epochs-30]="--epochs 30"
  [temperature-0.05]="--temperature 0.05"
  [faiss-hard-negatives]="--hard-negatives"
  [dropout-0.5]="--dropout 0.5"
  # 30-epoch rows of the second session (compare with e30, the same folds)
  [e30]="--epochs 30"
  [e30-t005]="--epochs 30 --temperature 0.05"
  [e30-grid4]="--epochs 30 --grid 4"
  [e30-views4]="--epochs 30 --views 4"
  [e30-taps567]="--epochs 30 --taps 5,6,7"
  [e30-lite01]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1"
  [e30-lite012]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"
  [e30-lite01-t005]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1 --temperature 0.05"
  [e60-lite01]="--backbones efficientnet_lite0,efficientnet_lite1"
  # fourth session: input resolution (Lite1's own is 240, Lite2's 260; the default is Lite0's 224)
  [e30-lite01-s260]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1 --input-size 260"
  [e30-s260]="--epochs 30 --input-size 260"
  # other seeds of the accurate recipe (their spread; ensembled with
  # python -m lookalike.evaluation.fold_ensemble data/train/cv/e30-lite01{,-seed1,-seed2,-seed3})
  [e30-lite01-seed1]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1 --seed 1"
  [e30-lite01-seed2]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1 --seed 2"
  [e30-lite01-seed3]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1 --seed 3"
  # the last two trunk stages fine-tuned from cached frozen stages
  [e30-ft2]="--epochs 30 --trainable-stages 2 --cache-frozen"
  [e30-ft2-lr1e-3]="--epochs 30 --trainable-stages 2 --cache-frozen --backbone-lr 1e-3"
  # fifth session: the old single-split losses, miners and head shapes, on the accurate recipe
  [e30-lite01-contrastive-cosine]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1 --loss contrastive-cosine --margin 0.3"
  [e30-lite01-contrastive-euclidean]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1 --loss contrastive-euclidean --margin 0.2"
  [e30-lite01-triplet-euclidean]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1 --loss triplet-euclidean --margin 0.2"
  [e30-lite01-triplet-cosine-batch-hard]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1 --loss triplet-cosine --margin 0.2 --miner batch-hard"
  [e30-lite01-head512]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1 --head 512"
  [e30-lite01-mlp]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1 --head 1024,256"
  [e30-lite01-dropout-0.5]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1 --dropout 0.5"
  [e30-lite01-dropout-0.8]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1 --dropout 0.8"
  [e30-lite01-head1024]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1 --head 1024"
  [e30-lite01-head512-seed1]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1 --head 512 --seed 1"
  [e30-lite01-head1024-seed1]="--epochs 30 --backbones efficientnet_lite0,efficientnet_lite1 --head 1024 --seed 1"
)
ORDER=(default epochs-30 temperature-0.05 faiss-hard-negatives dropout-0.5 e30 e30-t005 e30-grid4
       e30-views4 e30-taps567 e30-lite01 e30-lite012 e30-lite01-t005 e60-lite01 e30-lite01-s260
       e30-s260 e30-lite01-seed1 e30-lite01-seed2 e30-lite01-seed3 e30-ft2
       e30-ft2-lr1e-3 e30-lite01-contrastive-cosine e30-lite01-contrastive-euclidean
       e30-lite01-triplet-euclidean e30-lite01-triplet-cosine-batch-hard e30-lite01-head512
       e30-lite01-mlp e30-lite01-dropout-0.5 e30-lite01-dropout-0.8
       e30-lite01-head1024 e30-lite01-head512-seed1 e30-lite01-head1024-seed1)

for row in "${@:-${ORDER[@]}}"; do
  echo "== $row" >&2
  # shellcheck disable=SC2086
  $LOOKALIKE train --config "$RECIPE" --cv 5 --out "$OUT/$row/model" --no-progress ${ROWS[$row]}
  uptime >&2
done

.venv/bin/python - "$OUT" "${@:-${ORDER[@]}}" <<'PY'
import json, sys
from pathlib import Path
from lookalike.evaluation.crossval import MARKDOWN_HEADER, markdown_row
out, rows = Path(sys.argv[1]), sys.argv[2:]
print(MARKDOWN_HEADER, end="")
for row in rows:
    cv = json.loads((out / row / "model.work" / "cv" / "cv.json").read_text())
    print(markdown_row(row, cv["summary"], cv["recipe"]["epochs"]))
PY
