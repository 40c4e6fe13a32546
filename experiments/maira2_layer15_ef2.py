"""MAIRA-2 layer 15, expansion factor 2 (F = 8192): see experiments/maira2_layer15.py."""

import importlib.util
import os


def get_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'maira2_layer15.py')
  spec = importlib.util.spec_from_file_location('maira2_layer15', path)
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  return base.get_config('2')
