"""Random ops under vmap's three randomness modes.

'error' refuses every random op; 'different' draws independently for each example, by
drawing once with the physical (batched) shape; 'same' draws once with the logical shape
and lets every example share it, so the draw is an unbatched tensor.

An op whose draws depend on the *values* of a batched input (bernoulli(p), normal(mean),
poisson...) cannot share one draw between examples, so 'same' refuses those. Ops that only
take a shape from a tensor (rand_like, uniform_...) can, and so can dropout, whose mask is
drawn from the shape alone.
"""
import torch

from ...core.levels import level_stack
from ..fallback import op_name
from ..interpreter import (
    BatchedTensor, VmapInterpreter, check_random, inplace_into_unbatched_message,
)
from ..registry import ensure_batched, logical_rank, pad_to_rank, register_rule

aten = torch.ops.aten


def _same_with_batched_input(func):
    # The parenthesis is torch.func's wording of the same refusal.
    return RuntimeError(
        f"vmap: aten::{op_name(func)} draws random values that depend on a batched input, "
        f"so randomness='same' cannot share one draw between the examples (Vmap does not "
        f"currently support same randomness with a batched tensor input). Use "
        f"randomness='different', or pass that input unbatched (in_dims=None)."
    )


def _overloads(*packets):
    """Every non-out overload of the given op packets."""
    return [
        getattr(p, name) for p in packets for name in p.overloads() if "out" not in name
    ]


def shape_only_rule(interp, func, args, bdims, kwargs):
    """Ops that take only a shape (and dtype) from their tensor: rand_like, uniform..."""
    check_random(interp, func)
    if any(d is not None for d in bdims[1:]):
        # randint_like.Tensor with a batched ``high``: the draw depends on it.
        if interp.randomness == "same":
            raise _same_with_batched_input(func)
        raise RuntimeError(
            f"vmap: aten::{op_name(func)} with a batched bound is not supported; pass the "
            f"bound as a Python number or unbatched tensor."
        )
    x = args[0]
    if interp.randomness == "same":
        return func(x[0], *args[1:], **kwargs), None
    return func(*args, **kwargs), 0


def inplace_rule(interp, func, args, bdims, kwargs):
    """In-place draws into ``self`` (uniform_, bernoulli_...)."""
    check_random(interp, func)
    self, *rest = args
    others_batched = any(d is not None for d in bdims[1:])
    if interp.randomness == "same" and others_batched:
        raise _same_with_batched_input(func)
    if bdims[0] is None:
        raise RuntimeError(inplace_into_unbatched_message(func))
    if interp.randomness == "same":
        draw = torch.empty_like(self[0])
        func(draw, *rest, **kwargs)
        return self.copy_(draw), 0
    rank = logical_rank(self, 0)
    rest = [pad_to_rank(a, d, rank) if d is not None else a for a, d in zip(rest, bdims[1:])]
    return func(self, *rest, **kwargs), 0


def value_dependent_rule(interp, func, args, bdims, kwargs):
    """Draws whose distribution comes from batched tensor values (bernoulli(p), normal...)."""
    check_random(interp, func)
    if interp.randomness == "same":
        raise _same_with_batched_input(func)
    rank = max(logical_rank(a, d) for a, d in zip(args, bdims) if isinstance(a, torch.Tensor))
    # Every tensor gets the batch dim, not only a broadcast: some kernels (binomial) lay
    # out, and so draw, their output after the first input's shape.
    padded = [
        pad_to_rank(ensure_batched(a, d, interp.batch_size), 0, rank)
        if isinstance(a, torch.Tensor) else a
        for a, d in zip(args, bdims)
    ]
    return func(*padded, **kwargs), 0


def multinomial(interp, func, args, bdims, kwargs):
    check_random(interp, func)
    if interp.randomness == "same":
        raise _same_with_batched_input(func)
    probs, num_samples, *rest = args
    # multinomial takes at most 2 dims: fold the batch into the rows.
    rows = probs.reshape(-1, probs.shape[-1])
    out = func(rows, num_samples, *rest, **kwargs)
    return out.reshape(*probs.shape[:-1], num_samples), 0


def native_dropout(interp, func, args, bdims, kwargs):
    x, p, train = (list(args) + [None])[:3]
    if train is False:
        return func(*args, **kwargs), 0
    check_random(interp, func)
    if interp.randomness != "same":
        return func(*args, **kwargs), 0
    # One mask for every example: dropout of ones gives the scaled mask to multiply by.
    scaled_mask, mask = func(torch.ones_like(x[0]), p, train)
    return (x * scaled_mask, mask), (0, None)


# bernoulli.p reads only self's shape: the probability is the float argument.
for _op in _overloads(aten.rand_like, aten.randn_like, aten.randint_like, aten.uniform,
                      aten.exponential, aten.cauchy, aten.geometric, aten.log_normal) + [
        aten.bernoulli.p]:
    register_rule(_op, shape_only_rule)
for _op in _overloads(aten.bernoulli_, aten.uniform_, aten.normal_, aten.exponential_,
                      aten.cauchy_, aten.geometric_, aten.log_normal_, aten.random_):
    register_rule(_op, inplace_rule)
for _op in ([aten.bernoulli.default, aten.bernoulli.Tensor]
            + _overloads(aten.poisson, aten._standard_gamma, aten.binomial, aten._sample_dirichlet)
            + [aten.normal.Tensor_float, aten.normal.float_Tensor, aten.normal.Tensor_Tensor]):
    register_rule(_op, value_dependent_rule)
register_rule(aten.multinomial.default, multinomial)
register_rule(aten.native_dropout.default, native_dropout)


# -- random factories without a tensor argument ------------------------------------------


def random_factory(interp, func, args, kwargs):
    """Run a random factory (rand, randn, randint, normal(float, float, size), randperm)
    called inside ``interp``'s vmap, where no tensor argument routes it to a level.

    'different' returns a BatchedTensor of ``interp``, 'same' an unbatched draw. Outer vmap
    levels get their own say: the draw itself is made by the next vmap level down.
    """
    check_random(interp, func)
    if interp.randomness == "same":
        return _draw_below(interp, func, args, kwargs)
    if func._schema.name == "aten::randperm":
        # randperm has no batch size to draw with: one permutation per example, drawn in
        # order from the same generator, as torch.func (and a loop) does.
        perms = [_draw_below(interp, func, args, kwargs) for _ in range(interp.batch_size)]
        return BatchedTensor(torch.stack(perms), interp)
    (pos,) = [i for i, a in enumerate(func._schema.arguments) if a.name == "size"]
    args = list(args)
    if pos < len(args):
        args[pos] = [interp.batch_size, *args[pos]]
    else:
        kwargs = {**kwargs, "size": [interp.batch_size, *kwargs["size"]]}
    return BatchedTensor(_draw_below(interp, func, args, kwargs), interp)


def _draw_below(interp, func, args, kwargs):
    stack = level_stack()
    for level in reversed(stack[: interp.depth]):
        if isinstance(level, VmapInterpreter) and level.alive:
            return random_factory(level, func, args, kwargs)
    return func(*args, **kwargs)
