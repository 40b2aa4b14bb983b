"""Reverse mode (grad, vjp). Importing this package registers the collectives' autograd formulas."""
from . import collectives  # noqa: F401
