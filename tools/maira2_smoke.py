"""One-command smoke test of MAIRA-2 for a user with the weights (jaxsae.bridge.maira2.smoke).

    python tools/maira2_smoke.py --model=microsoft/maira-2            # GPU, bfloat16 (~15 GB)
    python tools/maira2_smoke.py --model=DIR --device=cpu --dtype=float32 --max_new_tokens=20
Prints a JSON report: load time, peak memory, tokens per kind, layer-15 norms, a findings report
and a grounded one with boxes on the original image. Without --frontal, two generated
2500x3000 radiographs are used (a shape check, not a clinical one).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxsae.bridge.maira2 import smoke  # pylint: disable=wrong-import-position
from jaxsae.config import ConfigError  # pylint: disable=wrong-import-position


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='microsoft/maira-2', help='Hub id or local directory')
  p.add_argument('--revision', default='', help='Hub commit, tag or branch')
  p.add_argument('--device', default='cuda')
  p.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float16', 'float32'))
  p.add_argument('--layer', type=int, default=15)
  p.add_argument('--frontal', help='a frontal chest X-ray (PNG/JPEG)')
  p.add_argument('--lateral', help='a lateral view of the same study')
  p.add_argument('--indication', default='Shortness of breath.')
  p.add_argument('--max_new_tokens', type=int, default=300)
  args = p.parse_args()
  images = {f: getattr(args, f) for f in ('frontal', 'lateral') if getattr(args, f)}
  try:
    report = smoke.run(
        args.model,
        args.revision,
        args.device,
        args.dtype,
        args.layer,
        images,
        args.indication,
        args.max_new_tokens,
    )
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(report, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
