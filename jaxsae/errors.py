"""The one error type for bad input: a config value, a file or a path that cannot work.

Its own module so that every layer (the formats, the JAX core, the torch bridge) can raise it
without importing more than the standard library.
"""


class ConfigError(ValueError):
  """A config value, file or path is missing, unknown or impossible; the message says which,
  why, and what to do."""
