"""jacrev, jacfwd and hessian: whole Jacobians from vjp/jvp mapped over a standard basis.

NOTE [Jacobians as one batched pass]
Row ``k`` of a Jacobian is the vjp of the one-hot cotangent ``e_k``; column ``k`` is the jvp
of the one-hot tangent ``e_k``. Mapping vjp (or jvp) with ``vmap`` over the rows of an
identity matrix gives every row (column) in a single batched pass instead of one pass per
row. Several outputs (or inputs) share one identity: it is cut into column blocks, one
per tensor, so the batch index runs over the flattened concatenation of all of them.

``chunk_size`` bounds the batch: the identity is only ever materialised ``chunk_size``
rows at a time, every chunk's result is written straight into the preallocated Jacobian,
and a chunk of one row calls vjp_fn directly (no vmap level at all), so the peak is the
Jacobian itself plus one chunk's backward pass.
"""
import functools

import torch

from ..core.levels import current_level
from ..core.wrapper import LevelTensor
from .forward import jvp
from .pytree import map_tensors, normalize_argnums, select_args, tree_flatten, tree_unflatten
from .reverse import _vjp_with_argnums
from .vmap import vmap


def _basis_rows(numels, start, length, like):
    """Rows ``start:start+length`` of the identity of size ``sum(numels)``, cut per tensor.

    Returns one ``(length, numel_i)`` block per tensor, with the dtype/device of ``like[i]``.
    """
    blocks = []
    offset = 0
    for numel, t in zip(numels, like):
        block = torch.zeros(length, numel, dtype=t.dtype, device=t.device)
        lo, hi = max(start, offset), min(start + length, offset + numel)
        if lo < hi:
            block[lo - start:hi - start, lo - offset:hi - offset].diagonal().fill_(1)
        blocks.append(block)
        offset += numel
    return blocks


def _check_chunk_size(chunk_size, api):
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(
            f"{api}: `chunk_size` should be greater than 0. Pass a positive int, or None for "
            f"all rows in one pass; got {chunk_size!r}."
        )


def _check_float(tensors, api, what):
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise RuntimeError(
                f"{api}: expected every {what} to be a Tensor, got {type(t).__name__}."
            )
        if t.is_complex():
            raise RuntimeError(
                f"{api}: Expected all {what}s to be real but received complex tensor "
                f"(dtype {t.dtype}); take the real and imaginary parts as separate real "
                f"tensors."
            )


def _with_diff_args(func, args, argnums_list, kwargs):
    """``func`` as a function of the differentiated args only; the others stay fixed.

    As in torch.func, the fixed Tensor args belong to the transform level that calls ``f``
    (a zero tangent under jvp), so ``f`` may write that level's values into them."""

    def f(*diff):
        level = current_level()
        full = [map_tensors(lambda x: level.adopt(x) if isinstance(x, torch.Tensor) else x, a)
                if i not in argnums_list and isinstance(a, (torch.Tensor, tuple, list, dict))
                else a for i, a in enumerate(args)]
        for i, d in zip(argnums_list, diff):
            full[i] = d
        return func(*full, **kwargs)

    return f


def _split(t, sizes, dim):
    # One piece is the common case (one output, one input): no view op at all.
    return (t,) if len(sizes) == 1 else torch.split(t, sizes, dim=dim)


def _regroup(per_out_per_in, out_spec, in_spec, argnums):
    """[output][input] blocks -> output pytree of (input pytree, or one tensor for int argnums)."""
    per_out = []
    for blocks in per_out_per_in:
        tree = tree_unflatten(list(blocks), in_spec)
        per_out.append(tree[0] if isinstance(argnums, int) else tree)
    return tree_unflatten(per_out, out_spec)


def jacrev(func, argnums=0, *, has_aux=False, chunk_size=None, _preallocate_and_copy=False):
    """The Jacobian of ``func`` w.r.t. the args at ``argnums``, by reverse mode.

    The result is an output pytree whose leaves are input pytrees (an int ``argnums``
    gives one tensor per output); a leaf has shape ``output.shape + input.shape``.
    ``chunk_size`` computes that many Jacobian rows per pass to bound memory.
    ``_preallocate_and_copy`` is accepted for torch.func compatibility: chunks are always
    written into a preallocated Jacobian here (NOTE [Jacobians as one batched pass]).

    >>> x = torch.randn(5)
    >>> torch.allclose(jacrev(torch.sin)(x), torch.diag(x.cos()))
    True
    """
    _check_chunk_size(chunk_size, "jacrev")

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        argnums_list = normalize_argnums(argnums, len(args), "jacrev")
        primals = select_args(args, argnums_list)
        flat_in, in_spec = tree_flatten(primals)
        _check_float(flat_in, "jacrev", "input")
        result = _vjp_with_argnums(func, args, kwargs, argnums_list, has_aux, "jacrev")
        if has_aux:
            output, vjp_fn, aux = result
        else:
            output, vjp_fn = result
        flat_out, out_spec = tree_flatten(output)
        _check_float(flat_out, "jacrev", "output")
        out_numels = [o.numel() for o in flat_out]
        rows = _jacobian_rows(vjp_fn, flat_out, out_numels, out_spec, flat_in, chunk_size)
        # rows[j] has shape (sum(out_numels), *in_j.shape); split it back per output.
        per_in = [_split(r, out_numels, 0) for r in rows]
        per_out_per_in = [
            [per_in[j][i].reshape(o.shape + x.shape) for j, x in enumerate(flat_in)]
            for i, o in enumerate(flat_out)
        ]
        jac = _regroup(per_out_per_in, out_spec, in_spec, argnums)
        return (jac, aux) if has_aux else jac

    return wrapper


def _jacobian_rows(vjp_fn, flat_out, out_numels, out_spec, flat_in, chunk_size):
    total = sum(out_numels)
    step = total if chunk_size is None else min(chunk_size, total)

    def rows_of(start, length):
        blocks = _basis_rows(out_numels, start, length, flat_out)
        if length == 1:
            cts = [b.view(o.shape) for b, o in zip(blocks, flat_out)]
            grads = tree_flatten(vjp_fn(tree_unflatten(cts, out_spec)))[0]
            return [g.unsqueeze(0) for g in grads]
        cts = [b.view((length,) + o.shape) for b, o in zip(blocks, flat_out)]
        return tree_flatten(vmap(vjp_fn)(tree_unflatten(cts, out_spec)))[0]

    if step >= total:
        if total == 0:
            return [x.new_zeros((0,) + x.shape) for x in flat_in]
        return rows_of(0, total)
    starts = range(0, total, step)
    first = rows_of(0, step)
    if any(isinstance(r, LevelTensor) for r in first):
        # Inside another transform the rows are wrappers, and writing them into fresh
        # tensors in place would leave those tensors outside the transform: concatenate.
        chunks = [first] + [rows_of(s, min(step, total - s)) for s in starts[1:]]
        return [torch.cat(col, dim=0) for col in zip(*chunks)]
    result = [x.new_empty((total,) + x.shape) for x in flat_in]
    for dst, src in zip(result, first):
        dst[:step].copy_(src)
    del first
    for start in starts[1:]:
        length = min(step, total - start)
        for dst, src in zip(result, rows_of(start, length)):
            dst[start:start + length].copy_(src)
    return result


def jacfwd(func, argnums=0, has_aux=False, *, randomness="error"):
    """The Jacobian of ``func`` w.r.t. the args at ``argnums``, by forward mode.

    Same result structure as :func:`jacrev`; one jvp per input element, all batched
    with vmap (``randomness`` is passed on to that vmap).

    >>> x = torch.randn(5)
    >>> torch.allclose(jacfwd(torch.sin)(x), torch.diag(x.cos()))
    True
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        argnums_list = normalize_argnums(argnums, len(args), "jacfwd")
        primals = select_args(args, argnums_list)
        flat_in, in_spec = tree_flatten(primals)
        _check_float(flat_in, "jacfwd", "input")
        in_numels = [x.numel() for x in flat_in]
        total = sum(in_numels)
        blocks = _basis_rows(in_numels, 0, total, flat_in)
        basis = tree_unflatten(
            [b.view((total,) + x.shape) for b, x in zip(blocks, flat_in)], in_spec
        )
        f = _with_diff_args(func, args, argnums_list, kwargs)

        def push(tangents):
            if has_aux:
                _, tangent_out, aux = jvp(f, primals, tangents, has_aux=True)
                return tangent_out, aux
            return jvp(f, primals, tangents)[1]

        results = vmap(push, randomness=randomness)(basis)
        aux = None
        if has_aux:
            results, aux = results
            # The aux does not depend on the tangents: every row holds the same value.
            flat_aux, aux_spec = tree_flatten(aux)
            aux = tree_unflatten([a[0] for a in flat_aux], aux_spec)
        flat_out, out_spec = tree_flatten(results)
        _check_float(flat_out, "jacfwd", "output")
        per_out_per_in = []
        for col in flat_out:
            out_shape = col.shape[1:]
            pieces = _split(col.movedim(0, -1), in_numels, -1)
            per_out_per_in.append(
                [p.reshape(out_shape + x.shape) for p, x in zip(pieces, flat_in)]
            )
        jac = _regroup(per_out_per_in, out_spec, in_spec, argnums)
        return (jac, aux) if has_aux else jac

    return wrapper


def hessian(func, argnums=0):
    """The Hessian of a scalar ``func``: forward-over-reverse, ``jacfwd(jacrev(func))``."""
    return jacfwd(jacrev(func, argnums), argnums)
