#!/usr/bin/env bash
# Fresh machine -> .venv, install, then the main job on the embedded offline default:
# train a Matryoshka BatchTopK SAE on planted-feature activations (experiments/synthetic.py),
# export it in both safetensors layouts, and print where everything is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
OUT=${OUT:-outputs/demo}
PY=.venv/bin/python
mkdir -p "$OUT"
$PY -m jaxsae.train --config=experiments/synthetic.py --workdir="$OUT/train" "$@"
$PY -m jaxsae.export_weights --workdir="$OUT/train" --out="$OUT/weights_dictionary_learning" \
  --format=dictionary_learning
$PY -m jaxsae.export_weights --workdir="$OUT/train" --out="$OUT/weights_saelens" --format=saelens
echo
echo "outputs in $OUT:"
echo "  training run, checkpoints, metrics.jsonl, TensorBoard: $OUT/train"
echo "  summary (FVU, L0, MMCS of planted features):           $OUT/train/summary.json"
echo "  loss curve and feature-density histogram:             $OUT/train/training_summary.png"
echo "  weights (dictionary_learning / SAELens layouts):      $OUT/weights_dictionary_learning, $OUT/weights_saelens"
