"""Linear algebra: the kernels already accept any number of leading batch dims.

Every tensor argument of these ops has a fixed number of trailing "core" dims (2 for a
matrix, 1 for pivots or tau) in front of which the kernel broadcasts batch dims. So the
rule gives every argument the vmap batch dim, pads each with size-1 dims after it until
all have the same number of batch dims, and calls the op as is. Outputs carry the batch
dim in front, except the empty placeholders some kernels return for results that were
not asked for (``compute_uv=False``, ``eigenvectors=False``).
"""
import torch

from ..registry import batch_rule, ensure_batched, logical_rank, pad_to_rank
from .indexing import get_arg

aten = torch.ops.aten


def _align_leading_dims(args, bdims, batch_size, core_ranks):
    slots = [
        (i, core) for i, core in enumerate(core_ranks)
        if i < len(args) and isinstance(args[i], torch.Tensor)
    ]
    batch_rank = max(logical_rank(args[i], bdims[i]) - core for i, core in slots)
    args = list(args)
    for i, core in slots:
        args[i] = pad_to_rank(ensure_batched(args[i], bdims[i], batch_size), 0, batch_rank + core)
    return args


def _out_bdims(out, batch_size):
    if isinstance(out, torch.Tensor):
        return 0
    return tuple(
        None if o.dim() == 1 and o.shape[0] == 0 and batch_size != 0 else 0 for o in out
    )


def _leading_batch_rule(*core_ranks, contiguous=False):
    """Rule for an op whose leading positional tensor args have these core ranks.

    ``contiguous``: the kernel flattens the batch dims with ``view``, which fails on the
    strides a batch dim moved to the front can leave.
    """

    def rule(interp, func, args, bdims, kwargs):
        batch_size = interp.batch_size
        for a, d, r in zip(args, bdims, core_ranks):
            if d is not None and isinstance(a, torch.Tensor) and a.dim() - 1 < r:
                # The batch dim would silently become one of the matrix dims.
                raise RuntimeError(
                    f"vmap: {func._schema.name}: expected an input with at least {r} "
                    f"dimensions per example, got a {a.dim() - 1}-dimensional example."
                )
        args = _align_leading_dims(args, bdims, batch_size, core_ranks)
        if contiguous:
            args = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
        out = func(*args, **kwargs)
        return out, _out_bdims(out, batch_size)

    return rule


batch_rule(
    aten.linalg_inv_ex.default, aten.cholesky.default, aten.linalg_cholesky_ex.default,
    aten.linalg_lu_factor_ex.default, aten.linalg_lu.default, aten.linalg_qr.default,
    aten.linalg_eig.default, aten._linalg_eigvals.default, aten.geqrf.default,
    aten.cholesky_inverse.default,
    aten.linalg_ldl_factor_ex.default, aten._linalg_det.default, aten._linalg_slogdet.default,
    aten._linalg_eigh.default, aten._linalg_svd.default,
    # Unbatched atol/rtol (keyword-only) broadcast against the batch dims from the right.
    aten.linalg_pinv.atol_rtol_tensor,
)(_leading_batch_rule(2))
batch_rule(aten.cholesky_solve.default, aten.triangular_solve.default,
           aten.linalg_solve_triangular.default, aten.linalg_lstsq.default)(
    _leading_batch_rule(2, 2))
batch_rule(aten.linalg_lu_solve.default, aten.linalg_ldl_solve.default)(
    _leading_batch_rule(2, 1, 2))
batch_rule(aten.lu_unpack.default, aten.linalg_householder_product.default)(
    _leading_batch_rule(2, 1))
batch_rule(aten.ormqr.default)(_leading_batch_rule(2, 1, 2))
batch_rule(aten.linalg_matrix_exp.default)(_leading_batch_rule(2, contiguous=True))

_solve_matrix_rule = _leading_batch_rule(2, 2)


@batch_rule(aten._linalg_solve_ex.default)
def solve_rule(interp, func, args, bdims, kwargs):
    # A right-hand side that is a vector per example must stay one; with the batch dim
    # in front PyTorch would read it as a matrix, so it is made an explicit column (row
    # for left=False) and squeezed back.
    A, B = args
    a_rank, b_rank = logical_rank(A, bdims[0]), logical_rank(B, bdims[1])
    a_shape = A.shape[-a_rank:]
    b_shape = B.shape[B.dim() - b_rank:]
    vector = b_rank == 1 or (b_rank == a_rank - 1 and tuple(b_shape) == tuple(a_shape[:-1]))
    if not vector:
        return _solve_matrix_rule(interp, func, args, bdims, kwargs)
    core_dim = -1 if get_arg(func, args, kwargs, "left") else -2
    out, out_bdims = _solve_matrix_rule(interp, func, (A, B.unsqueeze(core_dim)), bdims, kwargs)
    return (out[0].squeeze(core_dim),) + tuple(out[1:]), out_bdims


@batch_rule(aten._linalg_check_errors.default)
def check_errors_rule(interp, func, args, bdims, kwargs):
    info, api_name = args[:2]
    # The batch of infos is a batch of matrices, whatever one example held.
    return func(info, api_name, is_matrix=False), None


@batch_rule(aten.trace.default)
def trace_rule(interp, func, args, bdims, kwargs):
    (x,) = args
    if x.dim() != 3:
        raise RuntimeError(f"trace: expected a matrix, but got tensor with dim {x.dim() - 1}")
    return x.diagonal(0, 1, 2).sum(-1), 0

