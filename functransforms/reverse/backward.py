"""A grad level's backward pass: the one entry the public transforms and the other
interpreters share (the forward fallback differentiates through it without the public API).
"""
import torch
from torch.autograd.variable import Variable

from ..core.mode import adopting_new_tensors
from ..core.wrapper import LevelTensor, differentiated_below
from .interpreter import GradInterpreter

_ENGINE = Variable._execution_engine


def autograd_grad(level, outputs, inputs, grad_outputs, retain_graph=False):
    """torch.autograd.grad that returns zeros for unused inputs and accepts constant outputs.

    Calls the engine directly: torch.autograd.grad's argument checks cost as much as a few
    ops, and every caller has already checked shapes (vjp_fn) or built the seed (grad).
    """
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    if not pairs:
        return tuple(torch.zeros_like(i) for i in inputs)
    # NOTE [Backward that a level below differentiates]: the engine runs backward formulas
    # with grad mode off unless create_graph, and then (1) torch's formulas pick
    # once-differentiable paths (silu, mish, logit and group_norm emit *_backward kernels;
    # det, solve and the norms take shortcuts), and (2) ops of those formulas on tensors
    # captured from below (``W.t()`` for ``W @ x`` with W tracked by an outer level) reach
    # no level and are recorded by nothing, so a Jacobian would silently lose its
    # dependence on W. When a level below will differentiate this backward pass (grad of
    # grad, jvp of grad, torch autograd around the transform) and grad mode was on when
    # this level began, the engine runs it as create_graph=True, as torch.func always does;
    # this level's own record of it is dropped with the wrappers. Otherwise the cheaper
    # once-differentiable path is taken. A formula on a captured tracked tensor alone
    # (``weight.t()`` in mm's) is recorded only with grad mode on, hence captures_tracked.
    create_graph = level.formulas_need_grad_mode or level.prev_grad_mode and (
        level.captures_tracked
        or any(differentiated_below(t) for t in (*outputs, *inputs, *grad_outputs))
    )
    level.in_backward = True
    try:
        grads = _ENGINE.run_backward(
            tuple(o for o, _ in pairs), tuple(g for _, g in pairs), retain_graph or create_graph,
            create_graph,
            tuple(inputs), True, False,  # allow_unreachable, accumulate_grad
        )
    finally:
        level.in_backward = False
    return tuple(torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs))


def unwrap(x, level):
    if isinstance(x, LevelTensor) and x._level is level:
        return x._value
    return x


def backward_at(level, outputs, inputs, cotangents, retain_graph=True):
    """Pull ``cotangents`` back from ``outputs`` to ``inputs`` (flat lists of level-``level``
    tensors recorded earlier), returning the gradients one level down.

    NOTE [Re-entering a vjp level]: the level was popped when its forward pass returned. Its
    graph is still there, so the backward pass re-enters the level on top of whatever
    transforms are active now (vmap(vjp_fn) puts it above the vmap), with the grad mode of
    this call.
    """
    level.prev_grad_mode = torch.is_grad_enabled()
    level.prev_fwd_grad = torch._C._is_fwd_grad_enabled()
    with level:
        # Lifting the cotangents routes every backward op through this level's lowering,
        # so levels below record it even when it touches only the cotangents (sum's
        # backward is ``ct.expand``); the engine itself runs with grad mode off.
        pairs = [(o, level.lift(ct, requires_grad=False)) for o, ct in zip(outputs, cotangents)
                 if ct is not None]
        grads = autograd_grad(level, [o for o, _ in pairs], inputs, [ct for _, ct in pairs],
                              retain_graph=retain_graph)
        return [unwrap(g, level) for g in grads]


def flat_vjp(func, primals):
    """``func(*primals)`` under a fresh grad level, for flat lists of tensors.

    Returns ``(outputs, pullback)``: the outputs one level down, and ``pullback(cotangents)``
    giving one gradient per primal. No pytrees and no argument checks: callers are
    interpreters that built the call themselves.
    """
    level = GradInterpreter()
    with level, torch.enable_grad():
        lifted = [level.lift(p, requires_grad=True) for p in primals]
        with adopting_new_tensors(level):
            out = func(*lifted)
        flat_out = list(out) if isinstance(out, (tuple, list)) else [out]
        values = [unwrap(o, level) for o in flat_out]

    def pullback(cotangents):
        return backward_at(level, flat_out, lifted, list(cotangents))

    return values, pullback
