"""Training metrics to `metrics.jsonl` and TensorBoard event files, and the end-of-run plots."""

from __future__ import annotations

import json
import os
import time
from typing import Mapping

import numpy as np


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


def save_plots(workdir: str, feature_density: np.ndarray) -> str:
  """loss curve + histogram of log10 feature density, as one PNG; returns its path."""
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
  dead = int(np.sum(feature_density == 0))
  ax_dens.hist(np.log10(feature_density[feature_density > 0] + 1e-12), bins=60)
  ax_dens.set_xlabel('log10 firing density')
  ax_dens.set_title(f'feature density ({dead} of {feature_density.size} never fired)')
  fig.tight_layout()
  path = os.path.join(workdir, 'training_summary.png')
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
