"""The JAX core never imports torch (the bridge is the only place that may)."""

import pytest
import subprocess
import sys

from helpers import REPO


@pytest.mark.slow
def test_core_training_never_imports_torch(tmp_path):
  code = f"""
import sys
sys.path.insert(0, {REPO!r})
from helpers import tiny_config
from jaxsae import trainer, weights
trainer.train_and_evaluate(tiny_config(**{{"train.steps": 10, "optim.decay_start": 8}}), {str(tmp_path)!r})
weights.export({str(tmp_path)!r}, {str(tmp_path / "w")!r}, "saelens")
weights.load({str(tmp_path / "w")!r})
assert "torch" not in sys.modules, [m for m in sys.modules if m.startswith("torch")][:5]
print("ok")
"""
  r = subprocess.run(
      [sys.executable, '-c', code], cwd=f'{REPO}/tests', capture_output=True, text=True, timeout=300
  )
  assert r.returncode == 0 and 'ok' in r.stdout, r.stderr[-3000:]
