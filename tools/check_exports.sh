#!/usr/bin/env bash
# Trains a small synthetic SAE, exports it in both layouts, and checks each export loads into the
# peer library it is meant for (dictionary_learning's MatryoshkaBatchTopKSAE via load_state_dict,
# SAELens's SAE.load_from_disk) and gives jaxsae's encodings. Needs .venv and .venv-peers
# (tools/install_peers.sh; SAELens additionally: .venv-peers/bin/pip install sae-lens)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-$(mktemp -d)}
.venv/bin/python -m jaxsae.train --config=experiments/synthetic.py --workdir="$W/train" \
  --config.train.steps=300 --config.optim.decay_start=250 --config.sae.threshold_start_step=100 \
  --config.train.progress_bar=False
for fmt in dictionary_learning saelens; do
  .venv/bin/python -m jaxsae.export_weights --workdir="$W/train" --out="$W/$fmt" --format=$fmt
  .venv/bin/python - "$W/$fmt" "$W/$fmt.npz" <<'PY'
import sys
import numpy as np
from experiments.synthetic import get_config
from jaxsae import weights
from jaxsae.data import synthetic
sae, _ = weights.load(sys.argv[1])
x = np.asarray(synthetic.SyntheticSource.from_config(get_config()).batch(10**6))[:256]
np.savez(sys.argv[2], x=x, expected_encode=np.asarray(sae.encode(x)), expected_decode=np.asarray(sae(x)))
PY
  echo "== $fmt"
  .venv-peers/bin/python tools/make_golden_fixture.py --check-export "$W/$fmt" --inputs "$W/$fmt.npz"
done
