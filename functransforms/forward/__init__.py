"""Forward mode (jvp). Importing this package registers every JVP-rule family."""
from .rules import bilinear, collectives, linear, pointwise, prims, reductions  # noqa: F401
