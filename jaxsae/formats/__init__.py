"""The on-disk contracts shared by the JAX core and the torch bridge; nothing here imports JAX or
torch, so each side reads and writes them without the other's framework.

  store    the activation store: append-only TensorStore zarr3 arrays, committed length last
  tokens   what each store row is: TOKEN_KINDS and the TOKEN_COLUMNS of its metadata
  split    which studies of a store are held out from training (by a hash of the study id)
  weights  trained SAEs as safetensors, in dictionary_learning's and SAELens's layouts
  names    study ids as safe, reversible file names
"""

__all__ = ['names', 'split', 'store', 'tokens', 'weights']
