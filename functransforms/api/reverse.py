"""grad, grad_and_value and vjp: reverse mode as functional transforms."""
import functools

import torch

from ..core.mode import adopting_new_tensors
from ..reverse.interpreter import GradInterpreter
from .pytree import (
    normalize_argnums,
    split_aux,
    tree_flatten,
    tree_map,
    tree_unflatten,
    unwrap_tree,
)


def _lift_inputs(level, tree, api):
    def lift(x):
        if not isinstance(x, torch.Tensor):
            raise RuntimeError(
                f"{api}: expected every input being differentiated to be a Tensor, got "
                f"{type(x).__name__}. Move non-Tensor arguments out of argnums."
            )
        if not (x.is_floating_point() or x.is_complex()):
            raise RuntimeError(
                f"{api}: can only differentiate with respect to floating point or complex "
                f"Tensors, got an input of dtype {x.dtype}. Convert it (e.g. x.float()) or do not "
                f"differentiate with respect to it."
            )
        return level.lift(x, requires_grad=True)
    if isinstance(tree, torch.Tensor):
        return lift(tree)
    return tree_map(lift, tree)


def _check_scalar_output(output, api):
    if not isinstance(output, torch.Tensor):
        raise RuntimeError(
            f"{api}(f)(*args): expected f(*args) to return a Tensor, got {type(output).__name__}."
        )
    if output.dim() != 0:
        raise RuntimeError(
            f"{api}(f)(*args): expected f(*args) to return a scalar Tensor, got a tensor with "
            f"{output.dim()} dims. Use vjp or jacrev for non-scalar outputs, or reduce the "
            f"output (e.g. .sum()) first."
        )


class _Leaf:
    def __repr__(self):
        return "*"


def _tree_str(spec):
    """A pytree structure as users write it, leaves shown as ``*``: ``(*, {'a': *})``."""
    return repr(tree_unflatten([_Leaf()] * spec.num_leaves, spec))


def _autograd_grad(level, outputs, inputs, grad_outputs=None, retain_graph=False):
    """torch.autograd.grad that returns zeros for unused inputs and accepts constant outputs."""
    pairs = [
        (o, g) for o, g in zip(outputs, grad_outputs or [None] * len(outputs)) if o.requires_grad
    ]
    if not pairs:
        return tuple(torch.zeros_like(i) for i in inputs)
    level.in_backward = True
    try:
        grads = torch.autograd.grad(
            [o for o, _ in pairs],
            inputs,
            [g for _, g in pairs] if grad_outputs is not None else None,
            retain_graph=retain_graph,
            create_graph=False,
            allow_unused=True,
        )
    finally:
        level.in_backward = False
    return tuple(torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs))


def grad_and_value(func, argnums=0, has_aux=False):
    """Like ``grad``, but returns ``(gradients, value)`` (``(gradients, (value, aux))`` with aux)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        api = "grad_and_value"
        argnums_list = normalize_argnums(argnums, len(args), api)
        with GradInterpreter() as level, torch.enable_grad():
            args = list(args)
            diff = [_lift_inputs(level, args[i], api) for i in argnums_list]
            for i, d in zip(argnums_list, diff):
                args[i] = d
            with adopting_new_tensors(level):
                result = func(*args, **kwargs)
            output, aux = split_aux(result, has_aux, f"{api}(f, has_aux=True)(*args)")
            _check_scalar_output(output, api)
            if len(diff) == 1 and isinstance(diff[0], torch.Tensor):
                grads = [unwrap_tree(_autograd_grad(level, [output], diff)[0], level)]
            else:
                flat_diff, diff_spec = tree_flatten(diff)
                grads = _autograd_grad(level, [output], flat_diff)
                grads = tree_unflatten([unwrap_tree(g, level) for g in grads], diff_spec)
            output = unwrap_tree(output, level)
            aux = unwrap_tree(aux, level)
        if isinstance(argnums, int):
            grads = grads[0]
        else:
            grads = tuple(grads)
        return (grads, (output, aux)) if has_aux else (grads, output)

    return wrapper


def grad(func, argnums=0, has_aux=False):
    """The gradient of a scalar-valued ``func`` with respect to the args at ``argnums``.

    >>> x = torch.randn([])
    >>> torch.allclose(grad(torch.sin)(x), x.cos())
    True
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        grads, value = grad_and_value(func, argnums, has_aux)(*args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return wrapper


def vjp(func, *primals, has_aux=False):
    """Run ``func(*primals)``; return ``(output, vjp_fn)`` (and ``aux`` with ``has_aux``).

    ``vjp_fn(cotangents)`` takes cotangents shaped like ``output`` and returns one gradient
    per primal. It can be called many times and inside other transforms (``vmap(vjp_fn)``).
    """
    level = GradInterpreter()
    with level, torch.enable_grad():
        lifted = _lift_inputs(level, primals, "vjp")
        with adopting_new_tensors(level):
            result = func(*lifted)
        output, aux = split_aux(result, has_aux, "vjp(f, *primals, has_aux=True)")
        flat_out, out_spec = tree_flatten(output)
        for o in flat_out:
            if not isinstance(o, torch.Tensor):
                raise RuntimeError(
                    f"vjp(f, *primals): expected f(*primals) to return only Tensors, got "
                    f"{type(o).__name__}."
                )
        flat_in, in_spec = tree_flatten(lifted)
        primals_out = tree_unflatten([unwrap_tree(o, level) for o in flat_out], out_spec)
        aux = unwrap_tree(aux, level)

    def vjp_fn(cotangents, retain_graph=True):
        flat_ct, ct_spec = tree_flatten(cotangents)
        if ct_spec != out_spec:
            raise RuntimeError(
                f"vjp_fn: expected cotangents with the same structure as the outputs of f, "
                f"{_tree_str(out_spec)}, got {_tree_str(ct_spec)}."
            )
        for ct, o in zip(flat_ct, flat_out):
            if not isinstance(ct, torch.Tensor):
                raise RuntimeError(f"vjp_fn: expected Tensor cotangents, got {type(ct).__name__}.")
            if ct.shape != o.shape:
                raise RuntimeError(
                    f"vjp_fn: a cotangent has shape {tuple(ct.shape)} but the output it belongs "
                    f"to has shape {tuple(o.shape)}."
                )
        # NOTE [Re-entering a vjp level]: the level was popped when vjp returned. Its graph is
        # still there, so the backward pass re-enters the level on top of whatever transforms
        # are active now (vmap(vjp_fn) puts it above the vmap), with the grad mode of this call.
        level.prev_grad_mode = torch.is_grad_enabled()
        with level:
            # Lifting the cotangents routes every backward op through this level's lowering,
            # so levels below record it even when it touches only the cotangents (sum's
            # backward is ``ct.expand``); the engine itself runs with grad mode off.
            flat_ct = [level.lift(ct, requires_grad=False) for ct in flat_ct]
            grads = _autograd_grad(level, flat_out, flat_in, flat_ct, retain_graph=retain_graph)
            grads = [unwrap_tree(g, level) for g in grads]
        return tree_unflatten(grads, in_spec)

    if has_aux:
        return primals_out, vjp_fn, aux
    return primals_out, vjp_fn
