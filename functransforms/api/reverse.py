"""grad, grad_and_value and vjp: reverse mode as functional transforms."""
import functools

import torch

from ..core.mode import adopting_new_tensors
from ..reverse.backward import autograd_grad, backward_at
from ..reverse.interpreter import GradInterpreter
from .pytree import (
    normalize_argnums,
    split_aux,
    tree_flatten,
    map_tensors,
    flatten_tensors,
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
    return map_tensors(lift, tree)


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


def _grad_and_value(func, argnums, has_aux, args, kwargs, api):
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
        if output.is_complex():
            raise RuntimeError(
                f"{api}(f)(*args): expected f(*args) to return a real scalar, got dtype "
                f"{output.dtype}. Differentiate its real part (.real) or absolute value instead."
            )
        # ones_like of the output, not a plain constant: every level below must own the
        # seed, since backward formulas write into buffers derived from it (functionalize
        # refuses writes into tensors it does not own; vmap into unbatched ones).
        seed = [torch.ones_like(output)]
        flat_diff, rebuilds, counts = [], [], []
        for d in diff:
            leaves, rebuild = flatten_tensors(d)
            flat_diff += leaves
            rebuilds.append(rebuild)
            counts.append(len(leaves))
        flat_grads = [
            unwrap_tree(g, level) for g in autograd_grad(level, [output], flat_diff, seed)
        ]
        grads, start = [], 0
        for rebuild, n in zip(rebuilds, counts):
            grads.append(rebuild(flat_grads[start:start + n]))
            start += n
        output = unwrap_tree(output, level)
        aux = unwrap_tree(aux, level)
    grads = grads[0] if isinstance(argnums, int) else tuple(grads)
    return grads, output, aux


def grad_and_value(func, argnums=0, has_aux=False):
    """Like ``grad``, but returns ``(gradients, value)`` (``(gradients, (value, aux))`` with aux)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        grads, output, aux = _grad_and_value(func, argnums, has_aux, args, kwargs,
                                             "grad_and_value")
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
        grads, _, aux = _grad_and_value(func, argnums, has_aux, args, kwargs, "grad_and_value")
        return (grads, aux) if has_aux else grads

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
            if ct.is_complex() != o.is_complex():
                raise RuntimeError(
                    f"vjp_fn: a cotangent has dtype {ct.dtype} but the output it belongs to has "
                    f"dtype {o.dtype}; a complex output needs a complex cotangent and a real "
                    f"output a real one."
                )
        grads = backward_at(level, flat_out, flat_in, flat_ct, retain_graph=retain_graph)
        return tree_unflatten(grads, in_spec)

    if has_aux:
        return primals_out, vjp_fn, aux
    return primals_out, vjp_fn
