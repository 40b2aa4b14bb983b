"""The JVP-rule table and helpers the rule families are written with.

A JVP rule sees the op's arguments one level down, split in two: ``primals`` (the
positional args, every dual of this level replaced by its primal) and ``tangents`` (one
entry per positional arg: the tangent, or None where the arg has none; a list for list
args such as ``cat``'s tensors). None always means "zero": rules must not materialise
zeros unless the formula really needs them.

    @jvp_rule(aten.mm.default)
    def mm(func, primals, tangents, kwargs):
        ...
        return out, out_tangent

``out_tangent`` is a tensor or None for a single output, or a tuple with one entry per
output. Rules run under the level's lowering context, so every op they call is handled
by the levels below.
"""
import torch

JVP_RULES = {}


def _overloads(op):
    if isinstance(op, torch._ops.OpOverloadPacket):
        return [getattr(op, name) for name in op.overloads()]
    return [op]


def jvp_rule(*ops):
    """Register the decorated function as the JVP rule of each op (overload or packet)."""

    def register(rule):
        for op in ops:
            for overload in _overloads(op):
                JVP_RULES[overload] = rule
        return rule

    return register


def register_rule(op, rule):
    for overload in _overloads(op):
        JVP_RULES[overload] = rule


def is_differentiable(x):
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def fit_tangent(t, out):
    """Make a tangent match its output's shape and dtype (broadcasting, type promotion)."""
    if t is None:
        return None
    if t.dtype != out.dtype:
        if not is_differentiable(out):
            return None
        t = t.to(out.dtype)
    if t.shape != out.shape:
        t = t.expand(out.shape)
    return t


def add_tangents(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b
