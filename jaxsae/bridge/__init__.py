"""The PyTorch bridge: everything that runs MAIRA-2 (or a LLaVA-style stand-in) in transformers.

The only part of jaxsae that may import torch or transformers. It meets the JAX core only through
files: it writes the activation store (jaxsae.formats.store) and reads exported safetensors weights.
"""
