"""jvp and linearize: forward mode as functional transforms."""
import torch

from ..core.wrapper import LevelTensor
from ..core.mode import adopting_new_tensors
from ..forward.interpreter import JvpInterpreter
from .pytree import check_outputs, split_aux, structure_repr, tree_flatten, tree_unflatten

_API = "jvp(f, primals, tangents)"


def _check_inputs(primals, tangents):
    # Each refusal also carries torch.func's wording, so code matching its messages still works.
    if not isinstance(primals, tuple):
        raise RuntimeError(
            f"{_API}: Expected primals to be a tuple. E.g. it should be valid to call "
            f"f(*primals). Got {type(primals).__name__}."
        )
    flat_primals, primals_spec = tree_flatten(primals)
    flat_tangents, tangents_spec = tree_flatten(tangents)
    if not isinstance(tangents, tuple) or primals_spec != tangents_spec:
        raise RuntimeError(
            f"{_API}: Expected primals and tangents to have the same python structure (one "
            f"tangent per primal, in a tuple like primals), got primals "
            f"{structure_repr(primals_spec)} and tangents {structure_repr(tangents_spec)}."
        )
    if not flat_primals:
        raise RuntimeError(f"{_API}: Expected primals to contain at least one Tensor.")
    for p, t in zip(flat_primals, flat_tangents):
        for name, x in (("primals", p), ("tangents", t)):
            if not isinstance(x, torch.Tensor):
                raise RuntimeError(
                    f"{_API}: Expected {name} to only contain Tensors, got {type(x).__name__}."
                )
        if not (p.is_floating_point() or p.is_complex()):
            raise RuntimeError(
                f"{_API}: primals must be floating point or complex Tensors to be "
                f"differentiated, got one of dtype {p.dtype}."
            )
        if p.shape != t.shape:
            raise RuntimeError(
                f"{_API}: each tangent must have the shape of its primal, got a primal of shape "
                f"{tuple(p.shape)} with a tangent of shape {tuple(t.shape)}."
            )
    return flat_primals, flat_tangents, primals_spec


def _primal_of(x, level):
    if isinstance(x, LevelTensor) and x._level is level:
        return x._value
    return x


def jvp(func, primals, tangents, *, strict=False, has_aux=False):
    """Run ``func(*primals)`` and push ``tangents`` forward through it.

    Returns ``(output, jvp_out)`` (and ``aux`` with ``has_aux``): ``jvp_out`` is the
    Jacobian of ``func`` at ``primals`` times ``tangents``, shaped like ``output``.

    >>> x = torch.randn(5)
    >>> _, t = jvp(torch.sin, (x,), (torch.ones(5),))
    >>> torch.allclose(t, x.cos())
    True
    """
    if strict:
        raise RuntimeError(
            f"{_API[:-1]}, strict=True): strict mode is not yet implemented (as in torch.func). "
            f"Call jvp without strict."
        )
    flat_primals, flat_tangents, spec = _check_inputs(primals, tangents)
    with JvpInterpreter() as level:
        duals = [
            level.lift(p, t if t.dtype == p.dtype else t.to(p.dtype))
            for p, t in zip(flat_primals, flat_tangents)
        ]
        with adopting_new_tensors(level):
            result = func(*tree_unflatten(duals, spec))
        output, aux = split_aux(result, has_aux, _API)
        flat_out, out_spec = tree_flatten(output)
        check_outputs(flat_out, _API)
        values = []
        out_tangents = []
        for o in flat_out:
            if isinstance(o, LevelTensor) and o._level is level:
                values.append(o._value)
                out_tangents.append(o._tangent)
            else:
                # The output does not depend on the primals: its tangent is zero.
                values.append(o)
                out_tangents.append(torch.zeros_like(o))
        if has_aux:
            aux_flat, aux_spec = tree_flatten(aux)
            aux = tree_unflatten([_primal_of(a, level) for a in aux_flat], aux_spec)
    result = (tree_unflatten(values, out_spec), tree_unflatten(out_tangents, out_spec))
    return result + (aux,) if has_aux else result


def linearize(func, *primals):
    """Evaluate ``func(*primals)`` once; return ``(output, jvp_fn)``.

    ``jvp_fn(*tangents)`` gives the same result as ``jvp(func, primals, tangents)[1]``
    without running ``func`` again.

    NOTE [linearize by vjp of vjp]: ``func`` runs once under a grad level; its vjp
    ``u -> J^T u`` is linear in ``u``, so the vjp of that map with respect to ``u`` is
    ``t -> J t``. Both backward graphs are built here, once; each ``jvp_fn`` call is then a
    single backward pass through the second one.
    """
    from .reverse import vjp

    flat_primals, _, primals_spec = _check_inputs(primals, primals)
    output, vjp_fn = vjp(func, *primals)
    flat_out, out_spec = tree_flatten(output)
    for o in flat_out:
        if not isinstance(o, torch.Tensor):
            raise RuntimeError(
                f"linearize(f, *primals): f must return only Tensors, got {type(o).__name__}."
            )

    def cotangent_map(*flat_cotangents):
        return vjp_fn(tree_unflatten(list(flat_cotangents), out_spec))

    _, transpose_fn = vjp(cotangent_map, *[torch.zeros_like(o) for o in flat_out])

    def jvp_fn(*tangents):
        flat_tangents, tangents_spec = tree_flatten(tangents)
        if tangents_spec != primals_spec:
            raise RuntimeError(
                f"linearize: jvp_fn expects tangents with the structure of the primals "
                f"({primals_spec}), got {tangents_spec}."
            )
        for p, t in zip(flat_primals, flat_tangents):
            if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                raise RuntimeError(
                    f"linearize: jvp_fn expects each tangent to be a Tensor shaped like its "
                    f"primal {tuple(p.shape)}, got "
                    f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}."
                )
        flat_tangents = [t if t.dtype == p.dtype else t.to(p.dtype)
                         for p, t in zip(flat_primals, flat_tangents)]
        result = transpose_fn(tree_unflatten(flat_tangents, primals_spec))
        return tree_unflatten(list(result), out_spec)

    return output, jvp_fn
