"""The batching-rule table and the helpers rule families are written with.

A batching rule sees the op's arguments one level down: every tensor that is batched at
this level arrives as its value with the batch dimension in front (dim 0), and ``bdims``
says, position by position, which arguments are batched (0) and which are not (None);
a list argument (``cat``, ``index``) gets a list of bdims. A rule returns
``(out, out_bdims)``: the op's result one level down and, for each tensor in it, 0 if
the batch dimension is in front, None if it is unbatched (one value covers them all).

    @batch_rule(aten.mm.default)
    def mm(interp, func, args, bdims, kwargs): ...

Rules run under the level's lowering context, so everything they call is handled by the
levels below.
"""
import torch

BATCH_RULES = {}


def elementwise(rule):
    """Mark a rule as elementwise: given only same-rank batched values (and non-tensor
    arguments) it would just call the op on them. The interpreter then serves that case
    without calling the rule (the fast lane for the most common ops)."""
    rule.elementwise = True
    return rule


def batch_rule(*ops):
    """Register the decorated function as the batching rule of each op (overload or packet)."""

    def register(rule):
        for op in ops:
            for overload in _overloads(op):
                BATCH_RULES[overload] = rule
        return rule

    return register


def _overloads(op):
    if isinstance(op, torch._ops.OpOverloadPacket):
        return [getattr(op, name) for name in op.overloads()]
    return [op]


def register_rule(op, rule):
    for overload in _overloads(op):
        BATCH_RULES[overload] = rule


# ---------------------------------------------------------------------------------------
# Axis helpers. Batched values always carry the batch dim in front.


def logical_rank(x, bdim):
    return x.dim() - (bdim is not None)


def ensure_batched(x, bdim, batch_size):
    """Give an unbatched value a (broadcast, non-copying) batch dim in front."""
    if bdim is not None:
        return x
    return x.unsqueeze(0).expand(batch_size, *x.shape)


def pad_to_rank(x, bdim, rank):
    """Insert size-1 dims after the batch dim so ``x``'s logical rank becomes ``rank``.

    That lets a batched value broadcast against unbatched values of higher rank.
    """
    missing = rank - logical_rank(x, bdim)
    if missing <= 0 or bdim is None:
        return x
    return x.reshape(x.shape[:1] + (1,) * missing + x.shape[1:])


def logical_dim(dim, rank):
    """Wrap a (possibly negative) logical dim into [0, rank), refusing the dims torch refuses
    (the physical op would accept one more, the batch dim's)."""
    bound = rank or 1
    if not -bound <= dim < bound:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-bound}, {bound - 1}], "
            f"but got {dim})"
        )
    if rank == 0:
        return 0
    return dim % rank if dim < 0 else dim


def physical_dim(dim, rank):
    """The physical dim of logical ``dim`` in a batched value of logical rank ``rank``."""
    return logical_dim(dim, rank) + 1
