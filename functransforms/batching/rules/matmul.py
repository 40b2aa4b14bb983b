"""Matrix products: mm, bmm, mv, dot, vdot and their fused add* forms.

``matmul``, ``linear``, ``einsum``, ``outer`` and ``tensordot`` are CompositeImplicit, so
what reaches vmap are these aten products plus views. Each product is served by one
batched kernel call:
  * both operands batched: the vmap dim becomes (one more) batch dim of ``bmm``;
  * only the left operand batched: the vmap dim is folded into its rows, so one ``mm``
    multiplies every example against the shared right operand without copying it;
  * only the right operand batched: folded into its columns the same way.
The add* ops are the product followed by ``beta * self + alpha * product``.
"""
import torch

from ..registry import batch_rule, logical_rank, pad_to_rank, register_rule

aten = torch.ops.aten


def _matrix_product(a, da, b, db, batch):
    """``a @ b`` per example, where each operand is a matrix (or a stack of ``batch``
    matrices, for bmm) per example. Returns the batched result."""
    if da is not None and db is not None:
        if not batch:
            return aten.bmm.default(a, b)
        n = a.shape[0] * a.shape[1]
        out = aten.bmm.default(a.reshape(n, *a.shape[2:]), b.reshape(n, *b.shape[2:]))
        return out.view(a.shape[0], a.shape[1], *out.shape[1:])
    if da is not None:
        # a: (B, [s,] n, k) against b: ([s,] k, m) -> fold B into the rows of each matrix.
        if not batch:
            B, n, k = a.shape
            return aten.mm.default(a.reshape(B * n, k), b).view(B, n, b.shape[-1])
        B, s, n, k = a.shape
        rows = a.transpose(0, 1).reshape(s, B * n, k)
        out = aten.bmm.default(rows, b)
        return out.view(s, B, n, b.shape[-1]).transpose(0, 1)
    # b: (B, [s,] k, m) against a: ([s,] n, k) -> fold B into the columns.
    if not batch:
        B, k, m = b.shape
        cols = b.transpose(0, 1).reshape(k, B * m)
        return aten.mm.default(a, cols).view(a.shape[0], B, m).transpose(0, 1)
    B, s, k, m = b.shape
    cols = b.permute(1, 2, 0, 3).reshape(s, k, B * m)
    out = aten.bmm.default(a, cols)
    return out.view(s, a.shape[-2], B, m).permute(2, 0, 1, 3)


def _matrix_vector(mat, dmat, vec, dvec):
    if dmat is not None and dvec is not None:
        return aten.bmm.default(mat, vec.unsqueeze(-1)).squeeze(-1)
    if dmat is not None:
        B, n, k = mat.shape
        return aten.mv.default(mat.reshape(B * n, k), vec).view(B, n)
    return aten.mm.default(vec, mat.t())


def _add_scaled(self_, dself, product, dproduct, beta, alpha, rank):
    """``(beta * self + alpha * product, bdim)``; like torch, beta == 0 ignores ``self``
    (NaNs included), so the result is unbatched when only ``self`` was batched."""
    if alpha != 1:
        product = product * alpha
    if beta == 0:
        return product, dproduct
    if dself is not None:
        self_ = pad_to_rank(self_, dself, rank)
        if dproduct is None:
            product = product.unsqueeze(0)
    if beta != 1:
        self_ = self_ * beta
    return product + self_, 0


@batch_rule(aten.mm.default)
def mm_rule(interp, func, args, bdims, kwargs):
    a, b = args
    ranks = [t.dim() - (d is not None) for t, d in zip(args, bdims)]
    if ranks != [2, 2]:
        # The folded kernels would report the batch dims; this is torch.func's wording.
        raise RuntimeError(
            f"vmap: mm: Shape mismatch: Got incorrect dims for mm(a, b). a has dim {ranks[0]} "
            f"and b has dim {ranks[1]} per example, but expected both to have dim 2."
        )
    return _matrix_product(a, bdims[0], b, bdims[1], batch=False), 0


@batch_rule(aten.bmm.default)
def bmm_rule(interp, func, args, bdims, kwargs):
    a, b = args
    return _matrix_product(a, bdims[0], b, bdims[1], batch=True), 0


@batch_rule(aten.mv.default)
def mv_rule(interp, func, args, bdims, kwargs):
    mat, vec = args
    return _matrix_vector(mat, bdims[0], vec, bdims[1]), 0


@batch_rule(aten.dot.default, aten.vdot.default)
def dot_rule(interp, func, args, bdims, kwargs):
    a, b = args
    da, db = bdims
    if func is aten.vdot.default:
        a = a.conj()
    if da is not None and db is not None:
        return aten.bmm.default(a.unsqueeze(1), b.unsqueeze(2)).view(a.shape[0]), 0
    if da is not None:
        return aten.mv.default(a, b), 0
    return aten.mv.default(b, a), 0


def _mm_product(a, da, b, db):
    if da is None and db is None:
        return aten.mm.default(a, b)
    return _matrix_product(a, da, b, db, batch=False)


def _bmm_product(a, da, b, db):
    if da is None and db is None:
        return aten.bmm.default(a, b)
    return _matrix_product(a, da, b, db, batch=True)


def _summed_bmm_product(a, da, b, db):
    # addbmm sums the stack of products; the stack dim follows the vmap dim when batched.
    return _bmm_product(a, da, b, db).sum(0 if da is None and db is None else 1)


def _mv_product(mat, dmat, vec, dvec):
    if dmat is None and dvec is None:
        return aten.mv.default(mat, vec)
    return _matrix_vector(mat, dmat, vec, dvec)


def _outer_product(u, du, v, dv):
    return u.unsqueeze(-1) * (v.unsqueeze(-2) if dv is None else v.unsqueeze(1))


def _fused_add(product, rank):
    """Rule for ``beta * self + alpha * product(a, b)`` ops; ``rank`` is the product's
    logical rank, which ``self`` is broadcast to."""

    def rule(interp, func, args, bdims, kwargs):
        self_, a, b = args
        dself, da, db = bdims
        return _add_scaled(self_, dself, product(a, da, b, db), _either(da, db),
                           kwargs.get("beta", 1), kwargs.get("alpha", 1), rank)

    return rule


_general_addmm = _fused_add(_mm_product, 2)


@batch_rule(aten.addmm.default)
def addmm_rule(interp, func, args, bdims, kwargs):
    self_, a, b = args
    dself, da, db = bdims
    if dself is None and da is not None and db is None and logical_rank(self_, None) < 2:
        # The common ``linear`` case: a bias row broadcasts over every folded row.
        B, n, k = a.shape
        out = aten.addmm.default(self_, a.reshape(B * n, k), b, beta=kwargs.get("beta", 1),
                                 alpha=kwargs.get("alpha", 1))
        return out.view(B, n, b.shape[-1]), 0
    return _general_addmm(interp, func, args, bdims, kwargs)


register_rule(aten.baddbmm.default, _fused_add(_bmm_product, 3))
register_rule(aten.addbmm.default, _fused_add(_summed_bmm_product, 2))
register_rule(aten.addmv.default, _fused_add(_mv_product, 1))
register_rule(aten.addr.default, _fused_add(_outer_product, 2))


def _either(d1, d2):
    return 0 if d1 is not None or d2 is not None else None
