#!/usr/bin/env bash
# The ablation table of benchmarks/RESULTS.md ("Training"): the default recipe with one thing
# changed per row, all scored on the same 300 held-out 20-candidate sets. Rows share one
# feature cache, so only the first run of each backbone/tap/view setting pays for features.
# Run from the repository root:  bash models/recipes/ablation.sh [ROW ...]
set -euo pipefail
LOOKALIKE=${LOOKALIKE:-.venv/bin/lookalike}
OUT=${OUT:-data/train/ablation}
RECIPE=models/recipes/default.toml

declare -A ROWS=(
  [untrained-lite0]="--epochs 0 --head none --taps none --grid-taps none --no-standardize"
  [untrained-stages]="--epochs 0 --head none"
  [infonce]=""
  [contrastive-cosine]="--loss contrastive-cosine --margin 0.3"
  [contrastive-euclidean]="--loss contrastive-euclidean --margin 0.2"
  [triplet-cosine]="--loss triplet-cosine --margin 0.2"
  [triplet-euclidean]="--loss triplet-euclidean --margin 0.2"
  [triplet-cosine-batch-hard]="--loss triplet-cosine --margin 0.2 --miner batch-hard"
  [triplet-euclidean-semi-hard]="--loss triplet-euclidean --margin 0.2 --miner semi-hard"
  [pair-bce]="--loss pair-bce"
  [infonce-faiss-hard]="--hard-negatives"
  [infonce-no-grid]="--grid-taps none"
  [infonce-last-stage-only]="--taps none --grid-taps none"
  [infonce-3-views]="--views 3"
  [fusion-lite0-lite2]="--backbones efficientnet_lite0,efficientnet_lite2"
)
ORDER=(untrained-lite0 untrained-stages infonce contrastive-cosine contrastive-euclidean
       triplet-cosine triplet-euclidean triplet-cosine-batch-hard triplet-euclidean-semi-hard
       pair-bce infonce-faiss-hard fusion-lite0-lite2 infonce-3-views infonce-no-grid
       infonce-last-stage-only)

for row in "${@:-${ORDER[@]}}"; do
  echo "== $row" >&2
  # shellcheck disable=SC2086
  $LOOKALIKE train --config "$RECIPE" --out "$OUT/$row" --no-progress ${ROWS[$row]}
  uptime >&2
done

.venv/bin/python - "$OUT" "${@:-${ORDER[@]}}" <<'PY'
import json, sys
from pathlib import Path
out, rows = Path(sys.argv[1]), sys.argv[2:]
print("| variant | top-1 | top-5 | MRR | training min | hardware |")
print("|---|---|---|---|---|---|")
for row in rows:
    extra = json.loads((out / row / "config.json").read_text())["extra"]
    m, t = extra["validation"], extra["training"]
    print(f"| {row} | {m['top1']:.3f} | {m['top5']:.3f} | {m['mrr']:.3f} | "
          f"{t['minutes']:.1f} | {t['hardware']} |")
PY
