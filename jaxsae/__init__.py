"""jaxsae: Matryoshka BatchTopK sparse autoencoders in JAX, for multimodal medical models.

The JAX core (this package minus `jaxsae.bridge`) never imports torch.
"""

__version__ = '0.1.0'
