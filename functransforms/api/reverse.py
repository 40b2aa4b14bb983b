"""grad, grad_and_value and vjp: reverse mode as functional transforms."""
import functools

import torch

from ..core.mode import adopting_new_tensors
from ..reverse.backward import autograd_grad, backward_at
from ..reverse.interpreter import GradInterpreter
from ..reverse.own_derivatives import own_derivatives_for
from .pytree import (
    check_outputs,
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


def _lift_args(level, args, argnums_list, api):
    """The positional args as ``level`` sees them: the differentiated ones as leaves that
    require grad, every other Tensor as a constant of the level (as torch.func wraps all
    inputs), so that ``f`` may write the level's values into them (``y.copy_(x)``) or build
    new tensors from them (``y.new_zeros(3)``) that it then writes into."""
    args = list(args)
    diff = []
    for i, a in enumerate(args):
        if i in argnums_list:
            continue
        args[i] = map_tensors(lambda x: _adopt(level, x), a) if _has_tensor_leaf(a) else a
    for i in argnums_list:
        d = _lift_inputs(level, args[i], api)
        diff.append(d)
        args[i] = d
    return args, diff


def _adopt(level, x):
    return level.adopt(x) if isinstance(x, torch.Tensor) else x


def _has_tensor_leaf(a):
    if isinstance(a, torch.Tensor):
        return True
    if isinstance(a, (tuple, list, dict)):
        return any(isinstance(x, torch.Tensor) for x in tree_flatten(a)[0])
    return False


def _grad_and_value(func, argnums, has_aux, args, kwargs, api):
    argnums_list = normalize_argnums(argnums, len(args), api)
    with GradInterpreter() as level, torch.enable_grad():
        args, diff = _lift_args(level, args, argnums_list, api)
        with adopting_new_tensors(level), own_derivatives_for(level):
            result = func(*args, **kwargs)
        output, aux = split_aux(result, has_aux, f"{api}(f)(*args)")
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
    return _vjp_with_argnums(func, primals, {}, None, has_aux)


def _vjp_with_argnums(func, args, kwargs, argnums, has_aux, api="vjp"):
    """vjp of ``func(*args, **kwargs)`` with respect to the args at ``argnums`` (all of them
    when None); the others are constants of the level (see ``_lift_args``). ``vjp_fn``
    returns one gradient per differentiated arg."""
    level = GradInterpreter()
    with level, torch.enable_grad():
        if argnums is None:
            lifted = _lift_inputs(level, args, api)
            call_args = lifted
        else:
            call_args, diff = _lift_args(level, args, argnums, api)
            lifted = tuple(diff)
        with adopting_new_tensors(level), own_derivatives_for(level):
            result = func(*call_args, **kwargs)
        output, aux = split_aux(result, has_aux, "vjp(f, *primals)")
        flat_out, out_spec = tree_flatten(output)
        check_outputs(flat_out, "vjp(f, *primals)")
        flat_in, in_spec = tree_flatten(lifted)
        primals_out = tree_unflatten([unwrap_tree(o, level) for o in flat_out], out_spec)
        aux = unwrap_tree(aux, level)

    def vjp_fn(cotangents, retain_graph=True, create_graph=None):
        # create_graph is accepted for torch.func's signature: whether the backward pass is
        # recorded follows grad mode, as there.
        flat_ct, ct_spec = tree_flatten(cotangents)
        if ct_spec != out_spec:
            raise RuntimeError(
                f"vjp_fn: Expected pytree structure of cotangents to be the same as pytree "
                f"structure of outputs to the function: pass cotangents shaped like the "
                f"outputs of f, {_tree_str(out_spec)}, got {_tree_str(ct_spec)}."
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
