"""The offline demo set: a few dozen synthetic chest X-ray studies and a tiny MAIRA-2 stand-in.

    python tools/make_demo_data.py [--out outputs/demo/data] [--studies 60]

Writes, deterministically (same bytes every run):
  OUT/images/*.png      greyscale radiograph-like drawings (lungs, heart, effusions, pacemaker,
                        lines and tubes), frontal for every study, lateral and prior for some
  OUT/manifest.jsonl    one study per line (study_id, frontal, lateral, prior_frontal, indication,
                        technique, comparison, prior_report, findings)
  OUT/labels.csv        the 14 CheXpert labels of each study's findings (1, 0, -1, blank), written
                        from the conditions the text was made from, not by reading the text
  OUT/model/            a tiny random LlavaForConditionalGeneration with its tokenizer and
                        processor (jaxsae.bridge.tiny_model), loadable with from_pretrained
The findings use real radiology vocabulary (with negations and hedges: "Possible small left
pleural effusion.", "... may represent atelectasis or early pneumonia."); the images match them only
roughly: this is data for running the pipeline, not for learning radiology.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image, ImageFilter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script: jaxsae from this checkout
  sys.path.insert(0, REPO)

from jaxsae.findings import labels as labels_lib  # pylint: disable=wrong-import-position

DEMO_CONFIG = os.path.join(REPO, 'experiments', 'demo.py')

SIZE = 128
INDICATIONS = (
    'Shortness of breath.',
    'Fever and cough.',
    'Chest pain.',
    'Evaluate for effusion.',
    'Intubated patient, evaluate tube position.',
    'Post line placement.',
    'Evaluate pacemaker leads.',
    'Hypoxia.',
)
SIDES = ('left', 'right', 'bilateral')
SIZES = ('small', 'moderate', 'large')
CHANGES = ('increased', 'decreased', 'unchanged')


def _condition(rng: np.random.Generator) -> dict:
  """A random set of findings for one patient at one time."""
  return {
      'effusion': (rng.choice(SIDES), rng.choice(SIZES)) if rng.random() < 0.4 else None,
      'cardiomegaly': (
          rng.choice(('mildly', 'moderately', 'severely')) if rng.random() < 0.3 else None
      ),
      'pacemaker': bool(rng.random() < 0.2),
      'ett': int(rng.integers(3, 7)) if rng.random() < 0.25 else None,
      'enteric': bool(rng.random() < 0.2),
      'cvc': bool(rng.random() < 0.25),
  }


def _evolve(prior: dict, rng: np.random.Generator) -> dict:
  """The same patient some days later: an effusion may change, tubes may come or go."""
  now = dict(prior)
  if prior['effusion'] is not None and rng.random() < 0.8:
    side, size = prior['effusion']
    i = SIZES.index(size) + int(rng.integers(-1, 2))
    now['effusion'] = None if i < 0 else (side, SIZES[min(i, 2)])
  elif rng.random() < 0.3:
    now['effusion'] = (rng.choice(SIDES), 'small')
  if rng.random() < 0.3:
    now['ett'] = None if prior['ett'] else int(rng.integers(3, 7))
  if rng.random() < 0.3:
    now['enteric'] = not prior['enteric']
  return now


# Ways of saying "no effusion, no pneumothorax" (the first is the common one).
NEGATIVES = (
    'No pleural effusion or pneumothorax.',
    'There is no pleural effusion or pneumothorax.',
    'No pleural effusion. No pneumothorax.',
    'No evidence of pleural effusion or pneumothorax.',
    'Pleural effusion and pneumothorax are absent.',
)
_RANK = {labels_lib.POSITIVE: 3, labels_lib.UNCERTAIN: 2, labels_lib.NEGATIVE: 1}


def _wording(rng: np.random.Generator) -> dict:
  """How one report words its findings, drawn from its own generator (the conditions and images
  keep the draws they always had): the negation's phrasing and the occasional hedge."""
  return {
      'negative': int(rng.choice(len(NEGATIVES), p=(0.6, 0.1, 0.1, 0.1, 0.1))),
      'no_pneumothorax': bool(rng.random() < 0.5),  # said beside an effusion
      'possible_effusion': str(rng.choice(SIDES[:2])) if rng.random() < 0.2 else None,
      'hedge': str(
          rng.choice(
              (
                  'Possible small {} pleural effusion.',
                  'A small {} pleural effusion cannot be excluded.',
              )
          )
      ),
      'basal_opacity': str(rng.choice(SIDES[:2])) if rng.random() < 0.15 else None,
      'heart_size': bool(rng.random() < 0.3),
      'no_consolidation': bool(rng.random() < 0.3),
  }


def report(cond: dict, prior: dict | None = None, wording: dict | None = None) -> tuple[str, dict]:
  """The findings text of `cond` and its CheXpert labels ({observation: 1, 0 or -1}; absent =
  not mentioned), both from the same facts: CheXpert's rule (positive > uncertain > negative)
  merges what the sentences say, and No Finding is positive when no pathology is positive or
  uncertain."""
  w = PLAIN if wording is None else wording
  parts, said = [], {}

  def say(observation: str, value: int) -> None:
    if _RANK[value] > _RANK.get(said.get(observation), 0):
      said[observation] = value

  if prior is not None:
    parts.append('Compared to the prior study:')
  if cond['ett'] is not None:
    how = (
        'Interval placement of an endotracheal tube, its tip'
        if prior and not prior['ett']
        else 'Endotracheal tube tip'
    )
    parts.append(f'{how} terminates {cond["ett"]} cm above the carina.')
    say('Support Devices', labels_lib.POSITIVE)
  elif prior is not None and prior['ett'] is not None:
    parts.append('Interval removal of the endotracheal tube.')
    say('Support Devices', labels_lib.NEGATIVE)
  if cond['enteric']:
    parts.append('Enteric tube courses below the diaphragm with the tip in the stomach.')
    say('Support Devices', labels_lib.POSITIVE)
  elif prior is not None and prior['enteric']:
    parts.append('Interval removal of the enteric tube.')
    say('Support Devices', labels_lib.NEGATIVE)
  if cond['cvc']:
    parts.append('Right internal jugular central venous catheter tip in the mid SVC.')
    say('Support Devices', labels_lib.POSITIVE)
  if cond['pacemaker']:
    parts.append(
        'Left chest wall pacemaker with leads terminating in the right atrium and right '
        'ventricle.'
    )
    say('Support Devices', labels_lib.POSITIVE)
  if cond['cardiomegaly']:
    stable = prior is not None and prior['cardiomegaly']
    parts.append(
        'Stable cardiomegaly.' if stable else f'The heart is {cond["cardiomegaly"]} enlarged.'
    )
    say('Cardiomegaly', labels_lib.POSITIVE)
  else:
    if w['heart_size']:
      parts.append('Heart size is normal.')
      say('Cardiomegaly', labels_lib.NEGATIVE)
    parts.append('The cardiomediastinal silhouette is within normal limits.')
    say('Enlarged Cardiomediastinum', labels_lib.NEGATIVE)
  if w['basal_opacity']:
    parts.append(
        f'Opacity at the {w["basal_opacity"]} base may represent atelectasis or early pneumonia.'
    )
    say('Lung Opacity', labels_lib.POSITIVE)
    say('Atelectasis', labels_lib.UNCERTAIN)
    say('Pneumonia', labels_lib.UNCERTAIN)
  if cond['effusion'] is not None:
    side, size = cond['effusion']
    s = 's' if side == 'bilateral' else ''
    text = f'{size.capitalize()} {side} pleural effusion{s} with adjacent atelectasis.'
    if prior is not None and prior['effusion'] is not None:
      before, after = SIZES.index(prior['effusion'][1]), SIZES.index(size)
      change = 'increased' if after > before else 'decreased' if after < before else 'unchanged'
      verb = ('is' if not s else 'are') if change == 'unchanged' else ('has' if not s else 'have')
      text = f'The {side} pleural effusion{s} {verb} {change}. ' + text
    parts.append(text)
    say('Pleural Effusion', labels_lib.POSITIVE)
    say('Atelectasis', labels_lib.POSITIVE)
    if w['no_pneumothorax']:
      parts.append('No pneumothorax.')
      say('Pneumothorax', labels_lib.NEGATIVE)
  else:
    if prior is not None and prior['effusion'] is not None:
      parts.append(f'Interval resolution of the {prior["effusion"][0]} pleural effusion.')
      say('Pleural Effusion', labels_lib.NEGATIVE)
    if w['possible_effusion']:
      parts.append(w['hedge'].format(w['possible_effusion']) + ' No pneumothorax.')
      say('Pleural Effusion', labels_lib.UNCERTAIN)
    else:
      parts.append(NEGATIVES[w['negative']])
      say('Pleural Effusion', labels_lib.NEGATIVE)
    say('Pneumothorax', labels_lib.NEGATIVE)
  if cond['effusion'] is None and not cond['cardiomegaly'] and not w['basal_opacity']:
    if w['no_consolidation']:
      parts.append('The lungs are clear without focal consolidation.')
      say('Consolidation', labels_lib.NEGATIVE)
    else:
      parts.append('The lungs are clear.')
  pathology = [o for o in labels_lib.OBSERVATIONS[1:] if o != 'Support Devices']
  hit = any(said.get(o) in (labels_lib.POSITIVE, labels_lib.UNCERTAIN) for o in pathology)
  said['No Finding'] = labels_lib.NEGATIVE if hit else labels_lib.POSITIVE
  return ' '.join(parts), said


# The plain wording (prior reports, and `findings` without a generator): no hedges.
PLAIN = {
    'negative': 0,
    'no_pneumothorax': False,
    'possible_effusion': None,
    'hedge': '',
    'basal_opacity': None,
    'heart_size': False,
    'no_consolidation': False,
}


def findings(cond: dict, prior: dict | None = None, wording: dict | None = None) -> str:
  """The findings text alone (`report`'s first half)."""
  return report(cond, prior, wording)[0]


def _ellipse(yy, xx, cy, cx, ry, rx):
  return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def draw(cond: dict, rng: np.random.Generator, lateral: bool = False) -> Image.Image:
  """A greyscale drawing in radiographic convention (patient's left on the image's right)."""
  yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
  img = np.full((SIZE, SIZE), 0.05, np.float32)
  img[_ellipse(yy, xx, 70, 64, 60, 52)] = 0.55  # body
  heart_w = {None: 16, 'mildly': 20, 'moderately': 24, 'severely': 28}[cond['cardiomegaly']]
  if lateral:
    img[_ellipse(yy, xx, 62, 64, 40, 30)] = 0.2  # lungs, superimposed
    img[_ellipse(yy, xx, 78, 52, 18, heart_w * 0.8)] = 0.7  # heart, anterior
    if cond['effusion'] is not None:
      img[(yy > 92) & _ellipse(yy, xx, 62, 64, 40, 30)] = 0.6  # posterior costophrenic angle
  else:
    for cx in (42, 86):
      img[_ellipse(yy, xx, 60, cx, 38, 18)] = 0.2  # lungs
    img[_ellipse(yy, xx, 80, 70, 16, heart_w)] = 0.72  # heart
    if cond['effusion'] is not None:
      side, size = cond['effusion']
      level = {'small': 88, 'moderate': 78, 'large': 66}[size]
      for cx, s in ((42, 'right'), (86, 'left')):
        if side in (s, 'bilateral'):
          img[(yy > level - 0.15 * np.abs(xx - cx)) & _ellipse(yy, xx, 60, cx, 38, 18)] = 0.6
    if cond['pacemaker']:
      img[22:30, 96:108] = 1.0  # generator, left chest wall
      for t in np.linspace(0, 1, 80):
        y, x = int(30 + 50 * t), int(100 - 28 * t)
        img[y, x] = 0.95  # lead
    if cond['ett'] is not None:
      img[0 : 44 - 2 * cond['ett'], 63:65] = 0.9  # endotracheal tube
    if cond['enteric']:
      img[0:112, 60:62] = 0.85  # enteric tube
    if cond['cvc']:
      for t in np.linspace(0, 1, 60):
        img[int(8 + 40 * t), int(40 + 18 * t)] = 0.9  # right IJ catheter
  img += rng.normal(0, 0.03, img.shape).astype(np.float32)
  pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), 'L')
  return pil.filter(ImageFilter.GaussianBlur(1.0))


def make_studies(out: str, n: int, seed: int = 0) -> list[dict]:
  """Writes the images, OUT/manifest.jsonl and OUT/labels.csv; returns the manifest's rows."""
  rng = np.random.default_rng(seed)
  words = np.random.default_rng([seed, 17])  # the wording's own draws
  os.makedirs(os.path.join(out, 'images'), exist_ok=True)
  rows, table = [], []
  for i in range(n):
    sid = f'demo-{i:03d}'
    has_prior, has_lateral = rng.random() < 0.5, rng.random() < 0.4
    prior = _condition(rng) if has_prior else None
    cond = _evolve(prior, rng) if has_prior else _condition(rng)
    row = {
        'study_id': sid,
        'frontal': f'images/{sid}_frontal.png',
        'lateral': None,
        'prior_frontal': None,
        'indication': str(rng.choice(INDICATIONS)),
        'technique': 'PA and lateral views of the chest.'
        if has_lateral
        else 'Portable AP view of the chest.',
        'comparison': f'Radiograph from {int(rng.integers(1, 30))} days earlier.'
        if has_prior
        else None,
        'prior_report': findings(prior) if has_prior else None,
    }
    row['findings'], said = report(cond, prior, _wording(words))
    table.append([said.get(o, labels_lib.NOT_MENTIONED) for o in labels_lib.OBSERVATIONS])
    draw(cond, rng).save(os.path.join(out, row['frontal']))
    if has_lateral:
      row['lateral'] = f'images/{sid}_lateral.png'
      draw(cond, rng, lateral=True).save(os.path.join(out, row['lateral']))
    if has_prior:
      row['prior_frontal'] = f'images/{sid}_prior.png'
      draw(prior, rng).save(os.path.join(out, row['prior_frontal']))
    rows.append(row)
  with open(os.path.join(out, 'manifest.jsonl'), 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  labels_lib.write_chexpert(
      os.path.join(out, 'labels.csv'), labels_lib.from_rows([r['study_id'] for r in rows], table)
  )
  return rows


def vocabulary_texts(rows: list[dict]) -> list[str]:
  """Every text the prompts can contain: the studies' sections and MAIRA-2's fixed wording."""
  from jaxsae.bridge.maira2 import processing  # pylint: disable=import-outside-toplevel

  texts = ['USER: ASSISTANT: </s>', processing.MISSING]
  for lateral in (False, True):
    for prior in (False, True):
      for m in processing.reporting_messages(lateral, prior, None, None, None, None, 'x'):
        texts += [c['text'] for c in m['content'] if c['type'] == 'text']
  for row in rows:
    texts += [
        v
        for k, v in row.items()
        if v and k not in ('study_id', 'frontal', 'lateral', 'prior_frontal')
    ]
  return texts


def finetune(
    model_dir: str, manifest_path: str, studies: int, steps: int, seed: int = 0, batch: int = 8
) -> float:
  """Teach the tiny model to write the first `studies` reports (teacher-forced, report tokens and
  the end token as labels), so that steering and loss recovered mean something in the demo;
  the remaining studies stay unseen for the held-out evaluation. The head runs on the labelled
  positions only (a [batch, tokens, 32207] logits tensor of MAIRA-2's vocabulary would not fit).
  Returns the last loss."""
  import torch  # pylint: disable=import-outside-toplevel
  from jaxsae import config as config_lib  # pylint: disable=import-outside-toplevel
  from jaxsae.bridge import export, loading, manifest, prompt  # pylint: disable=import-outside-toplevel
  from jaxsae.bridge.maira2 import checkpoint  # pylint: disable=import-outside-toplevel
  from jaxsae.bridge.maira2 import modeling as maira2_modeling  # pylint: disable=import-outside-toplevel

  torch.manual_seed(seed)
  c = config_lib.load_experiment(DEMO_CONFIG)
  c.model.name = model_dir
  model, processor = loading.load(c)
  image_token = model.config.image_token_id
  preps = [
      prompt.prepare(processor, st, dict(st.images()), True, image_token)
      for st in manifest.read(manifest_path, teacher_forcing=True)[:studies]
  ]
  optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
  model.train()
  for step in range(steps):
    chunk = [preps[(step * batch + i) % len(preps)] for i in range(batch)]
    inputs = export.collate(chunk, 0, torch.device('cpu'), torch.float32)
    labels = torch.full_like(inputs['input_ids'], -100)
    for i, p in enumerate(chunk):
      report = np.flatnonzero(p.kinds == prompt.REPORT)
      keep = np.append(report, report[-1] + 1) if report[-1] + 1 < len(p.kinds) else report
      labels[i, keep] = inputs['input_ids'][i, keep]
    hidden = model.model(**inputs, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    labelled = targets != -100
    logits = model.lm_head(hidden[:, :-1][labelled])
    loss = torch.nn.functional.cross_entropy(logits, targets[labelled])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
  model.eval()
  if isinstance(model, maira2_modeling.Maira2ForConditionalGeneration):
    checkpoint.save_weights(model, model_dir)  # keep the release's layout (key names, shards)
  else:
    model.save_pretrained(model_dir)
  return float(loss.detach())


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', default=os.path.join('outputs', 'demo', 'data'))
  p.add_argument('--studies', type=int, default=60)
  p.add_argument('--hidden', type=int, default=64, help="the tiny model's width (sae.d)")
  p.add_argument('--layers', type=int, default=None, help='decoder layers (4 LLaVA, 17 MAIRA-2)')
  p.add_argument(
      '--model',
      choices=('llava', 'maira2'),
      default='llava',
      help="the small LLaVA stand-in, or a tiny MAIRA-2 in the real checkpoint's layout",
  )
  p.add_argument('--seed', type=int, default=0)
  p.add_argument(
      '--finetune_steps',
      type=int,
      default=0,
      help='train the tiny model on the first --finetune_studies reports (demo: 150)',
  )
  p.add_argument('--finetune_studies', type=int, default=48)
  args = p.parse_args()
  rows = make_studies(args.out, args.studies, args.seed)
  model_dir = os.path.join(args.out, 'model')
  if args.model == 'maira2':
    from jaxsae.bridge.maira2 import checkpoint  # pylint: disable=import-outside-toplevel

    checkpoint.build(
        model_dir,
        vocabulary_texts(rows),
        hidden=args.hidden,
        layers=args.layers or 17,
        seed=args.seed,
    )
  else:
    from jaxsae.bridge import tiny_model  # pylint: disable=import-outside-toplevel

    tiny_model.build(
        model_dir,
        tiny_model.words(vocabulary_texts(rows)),
        hidden=args.hidden,
        layers=args.layers or 4,
        seed=args.seed,
    )
  print(
      f'wrote {len(rows)} studies to {args.out}/manifest.jsonl (their finding labels to '
      f'{args.out}/labels.csv) and the tiny model to {args.out}/model'
  )
  if args.finetune_steps:
    loss = finetune(
        os.path.join(args.out, 'model'),
        os.path.join(args.out, 'manifest.jsonl'),
        args.finetune_studies,
        args.finetune_steps,
        args.seed,
        batch=8 if args.model == 'llava' else 1,  # MAIRA-2's studies are ~1.5-4.4k tokens long
    )
    print(
        f'fine-tuned the tiny model for {args.finetune_steps} steps on the first '
        f'{args.finetune_studies} reports (last loss {loss:.3f})'
    )


if __name__ == '__main__':
  main()
