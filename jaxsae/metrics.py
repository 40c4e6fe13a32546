"""Training metrics to `metrics.jsonl` and TensorBoard event files, the end-of-run plots, and the
one definition of a dead latent.

Dead, wherever a "dead fraction" or "dead latents" is reported (the training summary, evaluate,
interpret): a latent that fires on none of N held-out tokens, N reported beside it
(`dead_latents`). The periodic training metric `auxk_dead_fraction` is another thing, AuxK's
notion: latents that fired on none of the last sae.dead_tokens_threshold *training* tokens.
"""

from __future__ import annotations

import json
import os
import time
from typing import Mapping

import numpy as np

DEAD = 'fires on none of the {n} held-out tokens'


def dead_latents(fires: np.ndarray, tokens: int) -> dict[str, float | int]:
  """The dead-latent figures from per-latent firing counts over `tokens` held-out tokens."""
  dead = np.asarray(fires) == 0
  return {
      'dead_fraction': float(np.mean(dead)),
      'dead_latents': int(np.sum(dead)),
      'dead_over_tokens': int(tokens),
  }


class MetricWriter:
  """Appends one JSON line per logged step and mirrors scalars to TensorBoard.

  On resume, lines past the restored step (written after the last checkpoint by the run that
  died) are dropped first, so the file reads as one uninterrupted run.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    # tensorboard's own event writer: no TensorFlow, and unlike tensorboardX it never imports torch.
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    self.path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(self.path):
      kept = [l for l in read_jsonl(self.path) if l['step'] <= resume_step]
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(json.dumps(l) + '\n' for l in kept)
      os.replace(tmp, self.path)
    self._file = open(self.path, 'a')
    self._tb = EventFileWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    row = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()
    from tensorboard.compat.proto import event_pb2, summary_pb2

    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    self._tb.add_event(
        event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
        )
    )
    self._tb.flush()

  def close(self) -> None:
    self._file.close()
    self._tb.close()


class NullWriter:
  """What processes other than the primary write: nothing."""

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    del step, scalars

  def close(self) -> None:
    pass


def read_jsonl(path: str) -> list[dict]:
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:  # a line cut short by a kill
        continue
  return rows


def save_plots(workdir: str, feature_density: np.ndarray | None, tokens: int = 0) -> str:
  """loss curve + histogram of log10 feature density over `tokens` held-out tokens (None: no
  held-out rows), as one PNG; returns its path."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  rows = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  fig, (ax_loss, ax_dens) = plt.subplots(1, 2, figsize=(11, 4))
  if rows:
    steps = [r['step'] for r in rows]
    ax_loss.plot(steps, [r['loss'] for r in rows], label='loss')
    fvu_keys = sorted(
        (k for k in rows[-1] if k.startswith('fvu/')), key=lambda k: int(k.rsplit('_', 1)[1])
    )
    for key in fvu_keys:
      ax_loss.plot(steps, [r[key] for r in rows], lw=0.8, label=key)
    ax_loss.set_yscale('log')
    ax_loss.legend(fontsize=7)
  ax_loss.set_xlabel('step')
  ax_loss.set_title('loss and per-prefix FVU')
  if feature_density is None:
    ax_dens.set_title('feature density: no held-out tokens to measure it on')
  else:
    dead = int(np.sum(feature_density == 0))
    ax_dens.hist(np.log10(feature_density[feature_density > 0] + 1e-12), bins=60)
    ax_dens.set_title(
        f'feature density over {tokens:,} held-out tokens\n'
        f'({dead} of {feature_density.size} dead: {DEAD.format(n=f"{tokens:,}")})',
        fontsize=9,
    )
  ax_dens.set_xlabel('log10 firing density')
  fig.tight_layout()
  path = os.path.join(workdir, 'training_summary.png')
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
