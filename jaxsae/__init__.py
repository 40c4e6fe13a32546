"""jaxsae: Matryoshka BatchTopK sparse autoencoders in JAX, for multimodal medical models.

The JAX core (this package minus `jaxsae.bridge`) never imports torch.

The Python API (jaxsae.api) is reachable from here: `jaxsae.load(path_or_hub_id)`, `jaxsae.train`,
`jaxsae.export`, `jaxsae.make_config`, `jaxsae.SAE`, `jaxsae.TopFeatures`. They are imported on
first use, so `import jaxsae` loads neither JAX nor anything else, and the command-line modules
start as fast as before.
"""

from typing import TYPE_CHECKING

__version__ = '0.1.0'

# The API's names, imported from jaxsae.api on first use (module __getattr__ below).
__all__ = ['SAE', 'TopFeatures', 'load', 'make_config', 'train', 'export']  # noqa: F822
_API = frozenset(__all__)

if TYPE_CHECKING:  # for editors and type checkers; at run time, __getattr__ below
  from jaxsae.api import SAE, TopFeatures, export, load, make_config, train  # noqa: F401


def __getattr__(name: str):
  if name in _API:
    from jaxsae import api  # pylint: disable=import-outside-toplevel (JAX: only when used)

    return getattr(api, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_API))
