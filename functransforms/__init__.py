"""Composable function transforms for PyTorch: vmap, grad, vjp, jvp and friends.

A drop-in companion to ``torch``: ``import functransforms as ft`` and use ``ft.vmap``,
``ft.grad``, ... with the names, signatures and semantics of ``torch.func``.
"""
from . import batching as _batching  # noqa: F401  (registers batching rules)
from .api.reverse import grad, grad_and_value, vjp
from .api.vmap import vmap
from .api.forward import jvp, linearize
from . import forward as _forward  # noqa: F401  (registers JVP rules)
from .forward.fallback import jvp_fallback_counts, reset_jvp_fallback_counts
from .api.jacobians import hessian, jacfwd, jacrev
from .nn import (
    combine_state_for_ensemble,
    functional_call,
    make_functional,
    make_functional_with_buffers,
    replace_all_batch_norm_modules_,
    stack_module_state,
)
from .batching.fallback import fallback_counts, reset_fallback_counts
from . import autograd_function as _autograd_function  # noqa: F401  (hooks Function.apply)
from .api.functionalize import functionalize
from .api.debug import debug_unwrap
from .api.capture import capture
from .api.graph import make_graph
from .api.control_flow import cond, fori_loop, scan, while_loop
from .api.custom_derivatives import custom_jvp, custom_vjp
from .api.collectives import (
    all_gather,
    axis_index,
    axis_size,
    pmax,
    pmean,
    pmin,
    process_axis,
    psum,
)

__all__ = [
    "cond",
    "while_loop",
    "fori_loop",
    "scan",
    "custom_vjp",
    "custom_jvp",
    "functionalize",
    "debug_unwrap",
    "capture",
    "make_graph",
    "psum",
    "pmean",
    "pmax",
    "pmin",
    "all_gather",
    "axis_index",
    "axis_size",
    "process_axis",
    "grad",
    "grad_and_value",
    "vjp",
    "vmap",
    "jacrev",
    "jacfwd",
    "hessian",
    "functional_call",
    "stack_module_state",
    "make_functional",
    "make_functional_with_buffers",
    "combine_state_for_ensemble",
    "replace_all_batch_norm_modules_",
    "fallback_counts",
    "reset_fallback_counts",
    "jvp",
    "linearize",
    "jvp_fallback_counts",
    "reset_jvp_fallback_counts",
]
