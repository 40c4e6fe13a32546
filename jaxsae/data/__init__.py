"""Where the training step's batches come from: the activation store or synthetic data."""

from jaxsae.data.source import ActivationSource, activation_scale, batches, open_source, to_device

__all__ = ['ActivationSource', 'activation_scale', 'batches', 'open_source', 'to_device']
