"""The on-disk contracts shared by the JAX core and the torch bridge: the activation store, its
token metadata, and the SAE weights layouts. Nothing here imports JAX or torch."""
