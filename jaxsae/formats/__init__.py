"""The on-disk contracts shared by the JAX core and the torch bridge; nothing here imports JAX or
torch, so each side reads and writes them without the other's framework.

  store    the activation store: append-only TensorStore zarr3 arrays, committed length last
  parts    one store written by several export processes: their shares and the root record
  tokens   what each store row is: TOKEN_KINDS and the TOKEN_COLUMNS of its metadata
  split    which studies of a store are held out from training (by a hash of the study id)
  weights  trained SAEs, in dictionary_learning's and SAELens's layouts
  torch_pickle  torch.save's format (dictionary_learning's ae.pt), without torch or unsafe pickle
  manifest_rows  the study manifest's rows (JSONL or CSV) as written
  names    study ids as safe, reversible file names
  hub      SAE weights on the Hugging Face Hub (hf://ORG/NAME/SUBFOLDER) to a local folder
  model_card  a published SAE's README.md: Hub metadata and its measured figures
"""

__all__ = [
    'hub',
    'manifest_rows',
    'model_card',
    'names',
    'parts',
    'split',
    'store',
    'tokens',
    'torch_pickle',
    'weights',
]
