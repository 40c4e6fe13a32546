"""MAIRA-2's grounded output: phrases with boxes, parsed leniently, and boxes mapped back to the
original image.

A grounded report wraps phrases as `<obj>phrase<box><x55><y45><x70><y56></box></obj>`: 100 bins
per axis, bin b -> (b + 0.5) / 100, relative to the 518-px centre crop the image processor took.
`parse` never raises: it returns what it could read and lists what is malformed, since a steered
model's markup is exactly what is being measured. `adjust_box` undoes the crop (the shorter side
was kept whole, the longer one cut equally on both sides), as MAIRA-2's processor does.
"""

from __future__ import annotations

import dataclasses
import re

BINS = 100
Box = tuple[float, float, float, float]  # (x_min, y_min, x_max, y_max) in [0, 1]


_TAG = re.compile(r'<obj>|</obj>|<box>|</box>|<([xy])(\d+)>')


@dataclasses.dataclass
class Phrase:
  text: str
  boxes: list[Box]


@dataclasses.dataclass
class Parsed:
  phrases: list[Phrase]
  problems: list[str]  # empty when the grounding markup is well-formed

  @property
  def plain(self) -> str:
    """The report without markup (what a target phrase is searched in)."""
    return ' '.join(p.text for p in self.phrases)

  @property
  def boxes(self) -> int:
    return sum(len(p.boxes) for p in self.phrases)


def bin_centre(b: int) -> float:
  return (b + 0.5) / BINS


def parse(text: str) -> Parsed:
  """Phrases (text outside `<obj>` is a phrase without boxes) and boxes of a generated report."""
  phrases, problems = [], []
  state, words, boxes, coords = 'out', [], [], []

  def flush_text(with_boxes):
    phrase = ' '.join(''.join(words).split())
    if phrase or with_boxes:
      phrases.append(Phrase(phrase, list(with_boxes)))
    words.clear()

  at = 0
  for m in _TAG.finditer(text):
    if state != 'box':
      words.append(text[at : m.start()])
    elif text[at : m.start()].strip():
      problems.append(f'text {text[at:m.start()].strip()!r} inside <box>')
    at, tag = m.end(), m.group(0)
    if tag == '<obj>':
      if state != 'out':
        problems.append('<obj> inside <obj>')
      flush_text([])
      state, boxes = 'obj', []
    elif tag == '</obj>':
      if state != 'obj':
        problems.append('</obj> without <obj>' if state == 'out' else '</obj> inside <box>')
      flush_text(boxes)
      state, boxes = 'out', []
    elif tag == '<box>':
      if state != 'obj':
        problems.append('<box> outside <obj>' if state == 'out' else '<box> inside <box>')
      state, coords = 'box', []
    elif tag == '</box>':
      if state != 'box':
        problems.append('</box> without <box>')
      else:
        box = _box(coords, problems)
        if box is not None:
          boxes.append(box)
      state = 'obj'
    elif state != 'box':
      problems.append(f'coordinate {tag} outside <box>')
    else:
      coords.append((m.group(1), int(m.group(2))))
  tail = text[at:]
  if state != 'box':
    words.append(tail)
  elif tail.strip():
    problems.append(f'text {tail.strip()!r} inside <box>')
  if state != 'out':
    problems.append(f'unclosed <{"box" if state == "box" else "obj"}> at the end')
    flush_text(boxes)
  else:
    flush_text([])
  return Parsed(phrases, problems)


def _box(coords: list[tuple[str, int]], problems: list[str]):
  axes = ''.join(a for a, _ in coords)
  if axes != 'xyxy':
    problems.append(f'a box needs <x><y><x><y>, got {"".join(f"<{a}{v}>" for a, v in coords)!r}')
    return None
  values = [v for _, v in coords]
  if any(not 0 <= v < BINS for v in values):
    problems.append(f'box bins {values} outside 0..{BINS - 1}')
    return None
  x0, y0, x1, y1 = values
  if x0 > x1 or y0 > y1:
    problems.append(f'box {values} has min > max')
  return tuple(bin_centre(v) for v in values)


def adjust_box(box: Box, width: int, height: int) -> Box:
  """`box`, relative to the centre square crop of a `width` x `height` image, made relative to the
  whole image (pixel positions truncated to integers first, as MAIRA-2's processor does)."""
  side = min(width, height)
  dx, dy = (width - side) // 2, (height - side) // 2
  x0, y0, x1, y1 = box
  return (
      int(x0 * side + dx) / width,
      int(y0 * side + dy) / height,
      int(x1 * side + dx) / width,
      int(y1 * side + dy) / height,
  )
