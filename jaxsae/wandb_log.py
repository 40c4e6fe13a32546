"""Optional Weights & Biases logging of a training run, beside metrics.jsonl and TensorBoard (never
instead of them): on when train.wandb.project is set, on the primary process only.

What goes to W&B: the config, the periodic training scalars under `train/` (the names of
metrics.jsonl), and at the end the training-summary figure and the summary's scalars. Nothing from
the environment is logged by us, and the config holds no secrets (interpret.llm.api_key_env is
the *name* of a variable, not its value).

Resume: the W&B run id is written once to WORKDIR/wandb_run_id.txt, so a rerun that resumes the
checkpoint resumes the same W&B run. W&B refuses a step lower than the highest it has, and the run
that died may have logged past its last checkpoint; so the training step is not W&B's step but an
ordinary metric, `train/step`, declared as every chart's x-axis (W&B's own step only counts log
calls and always grows). The steps a dead run logged after its last checkpoint are logged again by
the resumed run at the same train/step: nothing is refused or lost, and the values agree (the
checkpoint holds the data position), tokens_per_s aside. Offline runs land in WORKDIR/wandb/.
"""

from __future__ import annotations

import math
import numbers
import os
import secrets
import string
from typing import Any, Mapping

import ml_collections

from jaxsae.errors import ConfigError

ID_FILE = 'wandb_run_id.txt'
STEP = 'train/step'


class NullRun:
  """What is used when W&B logging is off (or on processes other than the primary): nothing."""

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    del step, scalars

  def finish(self, summary: Mapping[str, Any], plot: str | None) -> None:
    del summary, plot


class WandbRun:
  """One W&B run per workdir, resumed by id across restarts."""

  def __init__(self, c: ml_collections.ConfigDict, workdir: str):
    try:
      import wandb
    except ImportError as e:
      raise ConfigError(
          f'train.wandb.project={c.train.wandb.project!r} asks for Weights & Biases logging, but '
          f"the wandb package is not installed ({e}). Install it with pip install 'jaxsae[wandb]' "
          "(or pip install 'wandb>=0.17'), or turn logging off with --config.train.wandb.project=''."
      ) from e
    self._wandb = wandb
    w = c.train.wandb
    workdir = os.path.abspath(workdir)
    kwargs = {'mode': w.mode} if w.mode else {}  # '': WANDB_MODE if set, else online
    self.run = wandb.init(
        project=w.project,
        entity=w.entity or None,
        name=w.name or os.path.basename(workdir),
        id=run_id(workdir),
        resume='allow',
        dir=workdir,
        config=c.to_dict(),
        reinit='finish_previous',  # a second run in one process (tests, notebooks) starts afresh
        **kwargs,
    )
    self.run.define_metric(STEP)
    self.run.define_metric('*', step_metric=STEP)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    self.run.log({STEP: int(step), **{f'train/{k}': float(v) for k, v in scalars.items()}})

  def finish(self, summary: Mapping[str, Any], plot: str | None) -> None:
    """The figure (logged at the final step) and the summary's scalars, then close the run."""
    if plot:
      self.run.log({STEP: int(summary['step']), 'training_summary': self._wandb.Image(plot)})
    for key, value in summary.items():
      if key != 'plot' and _is_scalar(value):  # 'plot' is a local path
        self.run.summary[f'summary/{key}'] = value
    self.run.finish()


def open_run(c: ml_collections.ConfigDict, workdir: str, primary: bool) -> WandbRun | NullRun:
  """The W&B run for this training run: a real one on the primary process when
  train.wandb.project is set, else one that logs nothing."""
  if primary and c.train.wandb.project:
    return WandbRun(c, workdir)
  return NullRun()


def run_id(workdir: str) -> str:
  """The run id stored in the workdir, written (atomically) by the first run that needs one."""
  path = os.path.join(workdir, ID_FILE)
  if os.path.exists(path):
    with open(path) as f:
      stored = f.read().strip()
    if stored:
      return stored
  # W&B's own ids look like this: 8 of [a-z0-9].
  new = ''.join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(new + '\n')
  os.replace(tmp, path)
  return new


def _is_scalar(value: object) -> bool:
  if isinstance(value, (bool, str)):
    return True
  return isinstance(value, numbers.Real) and math.isfinite(value)
