#!/usr/bin/env bash
# Issue 14, third to sixth sessions: re-rankers and test-time variants measured on the CV folds
# (benchmarks/RESULTS.md, "Third session"). The two CV rows are re-run with their fold models
# kept (standardisation + head per fold, fold-K.head.safetensors; the folds are deterministic,
# so the figures are those of cv-ablation.sh's e30 and e30-lite01), then
# lookalike.evaluation.fold_rerank scores, out of fold, flip TTA and region late interaction
# (lam and the other knobs chosen on the other folds). The region maps and mirrored features of
# all 3,000 images are computed once (data/train/region-cache, one pass of Lite0 + Lite1).
# Run from the repository root:  bash models/recipes/cv-rerank.sh
set -euo pipefail
LOOKALIKE=${LOOKALIKE:-.venv/bin/lookalike}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-data/train/cv}
RECIPE=models/recipes/default.toml
FUSION=efficientnet_lite0,efficientnet_lite1
# Up to the fifteenth session the accurate model was this two-trunk fusion; its rows say so.
LITE01=(--set "backbones=$FUSION")

$LOOKALIKE train --config "$RECIPE" --cv 5 --out "$OUT/e30/model" --no-progress --epochs 30 \
  --keep-fold-models
$LOOKALIKE train --config "$RECIPE" --cv 5 --out "$OUT/e30-lite01/model" --no-progress \
  --epochs 30 --backbones "$FUSION" --keep-fold-models

$PYTHON -m lookalike.evaluation.fold_rerank --config "$RECIPE" --set epochs=30 \
  --cv-dir "$OUT/e30/model.work/cv"
$PYTHON -m lookalike.evaluation.fold_rerank --config models/recipes/accurate.toml \
  "${LITE01[@]}" --cv-dir "$OUT/e30-lite01/model.work/cv"
# Untrained regions from the fold models: their exact location terms (the /explain split; one
# forward pass of each fold's images per fold) and the head's per-location terms.
$PYTHON -m lookalike.evaluation.fold_rerank --config models/recipes/accurate.toml \
  "${LITE01[@]}" --cv-dir "$OUT/e30-lite01/model.work/cv" --regions explain-7x7,head-7x7,head-3x3
# What flip TTA costs, end to end on onnx-int8 (plain and TTA interleaved).
for model in models/default models/accurate; do
  $PYTHON -m lookalike.evaluation.fold_rerank --config "$RECIPE" --cv-dir unused \
    --speed-model "$model"
done
# Fifth session: the re-ranker's score on verification pairs (lam nested on AUC), and region
# vectors *trained* for late interaction (a linear map of the trunks' 7 x 7 locations, per fold,
# on the fold's training pairs), scored out of fold on sets and verification pairs.
$PYTHON -m lookalike.evaluation.fold_rerank --config models/recipes/accurate.toml \
  "${LITE01[@]}" --cv-dir "$OUT/e30-lite01/model.work/cv" --regions explain-7x7,head-7x7 --verification
# Variants measured beside it (RESULTS.md, "Sixth session" and "Seventh session"), none shipped:
# fold_learned_regions ... --dim 128|512, --epochs 10, --seed 1-4, --symmetric, --temperature 0.1,
# --maps 2, --scales 7,3,1, --batch-size 64|256; later --mirrored-pairs, --mirror-candidates,
# and (twelfth session, after the weights shipped) --pooling mean, --importance-lr 0.03,
# --epochs 10; fourteenth session: --temperature 0.02|0.1, --stages 3,4,5,6,7|4,5,6,7,8,
# --mirrored-pairs again (the map's temperature 0.03, now the default, shipped); fifteenth:
# --seed 2, --batch-size 64, and --config a copy of accurate.toml with Lite2 added (its own CV
# row with --keep-fold-models and region cache) with --cv-dir that row's.
# The re-ranker as shipped from the sixth to the fifteenth session (the pair score's hubness
# term since the seventh; the query regions' learned weights, --pooling weighted, the
# default, since the twelfth), measured on the two-trunk row; it is written into the bundle
# (--write-rerank) at the end, on the three-trunk accurate row.
$PYTHON -m lookalike.evaluation.fold_learned_regions --config models/recipes/accurate.toml \
  "${LITE01[@]}" --cv-dir "$OUT/e30-lite01/model.work/cv"
# Seventh session: the plain pair score's hubness correction (/compare), per model, on its own
# recipe's folds: the default's CV row with its fold models kept (60 epochs, as shipped), then
# the cohort and the calibration entry 'hubness' of each model.
$LOOKALIKE train --config "$RECIPE" --cv 5 --out "$OUT/default/model" --no-progress \
  --keep-fold-models
$PYTHON -m lookalike.evaluation.fold_hubness --config "$RECIPE" \
  --cv-dir "$OUT/default/model.work/cv" --write-calibration models/default
$PYTHON -m lookalike.evaluation.fold_hubness --config models/recipes/accurate.toml \
  "${LITE01[@]}" --cv-dir "$OUT/e30-lite01/model.work/cv"
# Sixteenth session: the accurate recipe gains Lite2 (three trunks, the head stored as int8
# rows), measured in the fifteenth (a copy of the recipe with Lite2 added); the bundle is
# rebuilt from the recipe's own CV row with its fold models kept, then calibrated: the plain
# pair score's cohort and 'hubness' entry; the map trained on all pairs into
# regions.safetensors, the model's embeddings of the training images (and the regions of the
# 800 the pair score's hubness is made of) into cohort.safetensors, and the weights (and the
# pair score's weight, hubness k and threshold) best over all folds, with the out-of-fold
# figures, into its calibration.json ('rerank');
$LOOKALIKE train --config models/recipes/accurate.toml --no-progress --keep-fold-models
rm -rf models/accurate && cp -r data/train/accurate/model models/accurate
$PYTHON -m lookalike.evaluation.fold_hubness --config models/recipes/accurate.toml \
  --cv-dir data/train/accurate/model.work/cv --write-calibration models/accurate
$PYTHON -m lookalike.evaluation.fold_learned_regions --config models/recipes/accurate.toml \
  --cv-dir data/train/accurate/model.work/cv --write-rerank models/accurate
# and its near-duplicate setting (calibration entry 'dedup'; planted set in report/accurate):
$LOOKALIKE dedup-evaluate ../shared/tll/pairs.csv --out report/accurate --model accurate \
  --write-calibration --no-progress
