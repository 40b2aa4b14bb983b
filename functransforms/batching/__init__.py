"""vmap's machinery. Importing this package registers every batching-rule family."""
from .rules import pointwise  # noqa: F401
