#!/usr/bin/env bash
# Fresh machine -> .venv, install, then the whole pipeline on the embedded offline default:
# synthetic chest X-ray studies and a tiny LLaVA model (MAIRA-2's stand-in, no network; briefly
# trained on 48 of the reports)
# -> activation store (TensorStore) -> Matryoshka BatchTopK SAE (experiments/demo.py)
# -> safetensors weights in both layouts -> a steering example and the in-model evaluation
# -> feature statistics, explanations, detection scores and the HTML feature browser.
# Rerunning resumes each step where it stopped. Studies 48-59 are held out of the export and
# used by the evaluation. DEMO_MODEL=maira2 runs it all on a tiny MAIRA-2 in the real checkpoint's
# layout instead (1369 tokens per image, hooked at decoder layer 15; slower).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
DEMO_MODEL=${DEMO_MODEL:-llava}
OUT=${OUT:-outputs/demo$([ "$DEMO_MODEL" = llava ] || echo "_$DEMO_MODEL")}
FINETUNE_STEPS=${FINETUNE_STEPS:-$([ "$DEMO_MODEL" = llava ] && echo 150 || echo 40)}
PY=.venv/bin/python
CFG=(--config=experiments/demo.py:$DEMO_MODEL --config.model.name="$OUT/data/model"
     --config.export.manifest="$OUT/data/manifest.jsonl" --config.data.store_path="$OUT/activations"
     --config.export.max_studies=48)
mkdir -p "$OUT"
$PY tools/make_demo_data.py --out "$OUT/data" --model "$DEMO_MODEL" --finetune_steps "$FINETUNE_STEPS"
$PY -m jaxsae.export_activations "${CFG[@]}"
$PY -m jaxsae.train "${CFG[@]}" --workdir="$OUT/train" "$@"
$PY -m jaxsae.export_weights --workdir="$OUT/train" --out="$OUT/weights_dictionary_learning" \
  --format=dictionary_learning
$PY -m jaxsae.export_weights --workdir="$OUT/train" --out="$OUT/weights_saelens" --format=saelens
$PY -m jaxsae.steer "${CFG[@]}" --weights="$OUT/weights_dictionary_learning" --feature=3 --alpha=1 \
  --relative --max_new_tokens=40 --out="$OUT/steer"
# Clinically scored steering: the same feature at several strengths, every baseline and steered
# report labelled for the 14 CheXpert findings (target flips, off-target changes, well-formedness).
$PY -m jaxsae.steer "${CFG[@]}" --weights="$OUT/weights_dictionary_learning" --feature=3 \
  --alpha=1,2,4 --relative --num_studies=8 --target='pleural effusion' --max_new_tokens=40 \
  --out="$OUT/steer_sweep"
$PY -m jaxsae.evaluate "${CFG[@]}" --weights="$OUT/weights_saelens" --num_studies=12 \
  --out="$OUT/evaluate"
$PY -c "import json, sys; r = json.load(open(sys.argv[1])); r.pop('per_study', None); print(json.dumps(r, indent=1))" \
  "$OUT/evaluate/evaluation.json"
# Interpretation over all 60 studies, image tokens included (for the X-ray heatmaps): statistics,
# their alignment with the studies' CheXpert finding labels (AUROC, sparse probes), explanations and
# detection scores written by the local stand-in model, the HTML browser.
ICFG=(--config=experiments/demo.py:$DEMO_MODEL --config.model.name="$OUT/data/model"
      --config.export.manifest="$OUT/data/manifest.jsonl"
      --config.data.store_path="$OUT/activations_interpret"
      "--config.export.keep_kinds=('image','prompt','report')"
      --config.findings.labels_file="$OUT/data/labels.csv")
$PY -m jaxsae.export_activations "${ICFG[@]}"
$PY -m jaxsae.interpret "${ICFG[@]}" --weights="$OUT/weights_saelens" --out="$OUT/interpret" \
  --config.interpret.llm.backend=local --config.interpret.llm.max_new_tokens=32 \
  --config.interpret.max_features=64
echo
echo "outputs in $OUT:"
echo "  studies (manifest.jsonl, images) and the tiny model:   $OUT/data"
echo "  activation store (TensorStore zarr3 + token metadata): $OUT/activations"
echo "  training run, checkpoints, metrics.jsonl, TensorBoard: $OUT/train"
echo "  summary (FVU, L0, dead fraction):                      $OUT/train/summary.json"
echo "  loss curve and feature-density histogram:             $OUT/train/training_summary.png"
echo "  weights (dictionary_learning / SAELens layouts):      $OUT/weights_dictionary_learning, $OUT/weights_saelens"
echo "  steering example (baseline vs steered report):       $OUT/steer"
echo "  clinically scored steering sweep (finding flips):     $OUT/steer_sweep"
echo "  finding labels (CheXpert format):                     $OUT/data/labels.csv"
echo "  in-model evaluation (FVU, L0, loss recovered, KL):     $OUT/evaluate/evaluation.json"
echo "  interpretation (statistics, explanations, scores):     $OUT/interpret"
echo "  feature-finding alignment (AUROC, probes, coverage):  $OUT/interpret/alignment.json"
echo
echo "feature browser: $(cd "$OUT/interpret" && pwd)/index.html"
