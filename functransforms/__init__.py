"""Composable function transforms for PyTorch: vmap, grad, vjp, jvp and friends.

A drop-in companion to ``torch``: ``import functransforms as ft`` and use ``ft.vmap``,
``ft.grad``, ... with the names, signatures and semantics of ``torch.func``.
"""
from . import batching as _batching  # noqa: F401  (registers batching rules)
from .api.reverse import grad, grad_and_value, vjp
from .api.vmap import vmap
from .batching.fallback import fallback_counts, reset_fallback_counts

__all__ = [
    "grad",
    "grad_and_value",
    "vjp",
    "vmap",
    "fallback_counts",
    "reset_fallback_counts",
]
