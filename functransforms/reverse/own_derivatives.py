"""Ops a grad level differentiates with our formula instead of torch's.

NOTE [Ops whose torch backward breaks at higher order]
torch autograd records an op on a GradTensor before the op reaches ``__torch_dispatch__``
(NOTE [Reverse mode rides on torch autograd]), so a grad level's node normally runs torch's
own backward formula. For ``linalg.det`` that formula, on tensor subclasses with grad mode on
(a backward that a level below differentiates), always takes its singular-matrix path:
det A = det U det Vh prod S from an SVD. Differentiating that again differentiates det U of
an orthogonal U, whose singular values are all 1, and the SVD's derivative divides by their
differences: jvp over two reverse levels of det comes out NaN or off by a percent (torch.func
too). Plain tensors never see this because torch picks the path per matrix there.
``logcumsumexp``'s formula takes log|grad| inside a where(); differentiated again where the
cotangent has a zero (one-hot cotangents of jacrev, or any third order), the branch the
where() drops divides by that zero: NaN (torch.func too).

So while a grad level runs ``f`` above a level that differentiates (only then does its
backward get differentiated), a torch-function mode hands the calls in ``OWN_DERIVATIVES``
to a custom Function whose formulas every level below can differentiate at any order; the
Function then travels down the levels like a user's (autograd_function.py), so each level
uses the same formulas. A mode is needed because nothing of ours sees the call before torch
autograd records it. (A Function's ``apply`` reaches the levels through autograd_function.py's
patch, installed when the package is imported.)
"""
import contextlib

import torch
from torch.overrides import TorchFunctionMode

from ..core.levels import level_stack
from ..core.mode import one_mode_while_held
from ..core.wrapper import LevelTensor
from ..forward.rules.linalg import det_tangent


def _eye_like(A):
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)


def _cofactor_times(A, det, grad):
    """grad * conj(cofactor matrix of A), torch's gradient of det: by a solve where A is
    invertible, through an SVD where |det A| < 100 eps (torch's own threshold).

    Each branch is evaluated at a point where it is smooth (the identity for the solve,
    distinct singular values 1..n for the SVD) wherever where() drops it, so the dropped
    branch contributes exact zeros to every derivative instead of 0 * inf."""
    n = A.shape[-1]
    eye = _eye_like(A)
    scaled = (grad * det.conj())[..., None, None]
    eps = torch.finfo(A.dtype).eps
    singular = (det.abs() < 100 * eps)[..., None, None]
    invertible_part = torch.linalg.solve(torch.where(singular, eye, A).mH, scaled * eye)
    distinct = torch.diag(torch.arange(1, n + 1, dtype=A.dtype, device=A.device))
    U, S, Vh = torch.linalg.svd(torch.where(singular, A, distinct))
    # det U det Vh through this Function too: torch's formula would take the SVD of U.
    alpha = (Determinant.apply(U) * Determinant.apply(Vh)).conj() * grad
    others = torch.where(eye.bool(), torch.ones_like(S)[..., None, :], S[..., None, :])
    D = alpha[..., None] * others.prod(-1)
    singular_part = (U * D[..., None, :]) @ Vh
    return torch.where(singular, singular_part, invertible_part)


class Determinant(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(A):
        return torch.linalg.det(A)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)
        ctx.save_for_forward(inputs[0], output)

    @staticmethod
    def backward(ctx, grad):
        A, det = ctx.saved_tensors
        if A.numel() == 0:
            return torch.zeros_like(A)
        return _cofactor_times(A, det, grad)

    @staticmethod
    def jvp(ctx, tangent):
        A, det = ctx.saved_tensors
        return det_tangent(A, det, tangent)


def _log_of_part(t, positive, floor):
    keep = t > 0 if positive else t < 0
    magnitude = torch.where(keep, t if positive else -t, torch.ones_like(t))
    return torch.where(keep, magnitude.log(), torch.full_like(t, floor))


def _weighted_scan(v, x, out, dim, reverse):
    """With W[i, j] = exp(x_i - out_j) (out = logcumsumexp(x, dim), so W <= 1 where used):
    reverse: (W v)_i = sum_{j >= i} W[i, j] v_j, else (W^T v)_j = sum_{i <= j} W[i, j] v_i.
    Summed in log space, v's positive and negative parts apart, as torch's formula does; only
    ever run on plain values, inside ScanByWeights.forward, so nothing differentiates the logs."""
    floor = torch.finfo(x.dtype).min
    total = None
    for positive in (True, False):
        log_v = _log_of_part(v, positive, floor)
        if reverse:
            part = (torch.logcumsumexp((log_v - out).flip(dim), dim).flip(dim) + x).exp()
        else:
            part = (torch.logcumsumexp(log_v + x, dim) - out).exp()
        total = part if total is None else total - part
    return total


class ScanByWeights(torch.autograd.Function):
    """``_weighted_scan`` as a Function whose derivatives are the same two scans again.

    Both scans are linear in v and each is the other's transpose, so every derivative, of
    any order, in v, x or out, is a scan of this Function times elementwise factors; the
    logs inside are never differentiated (torch's formula takes log|grad| under a where(),
    and differentiating it again at a zero of grad gives NaN)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(v, x, out, dim, reverse):
        return _weighted_scan(v, x, out, dim, reverse)

    @staticmethod
    def setup_context(ctx, inputs, output):
        v, x, out, ctx.dim, ctx.reverse = inputs
        ctx.save_for_backward(v, x, out, output)
        ctx.save_for_forward(v, x, out, output)

    @staticmethod
    def backward(ctx, grad):
        v, x, out, result = ctx.saved_tensors
        dim, reverse = ctx.dim, ctx.reverse
        # reverse: d result = W dv + result * dx - W (v * dout); forward (W^T):
        # d result = W^T dv + W^T (v * dx) - result * dout. Transposed:
        if reverse:
            transposed = ScanByWeights.apply(grad, x, out, dim, False)
            return transposed, grad * result, -v * transposed, None, None
        transposed = ScanByWeights.apply(grad, x, out, dim, True)
        return transposed, v * transposed, -grad * result, None, None

    @staticmethod
    def jvp(ctx, dv, dx, dout, _dim, _reverse):
        v, x, out, result = ctx.saved_tensors
        dim, reverse = ctx.dim, ctx.reverse
        total = None

        def add(t):
            nonlocal total
            total = t if total is None else total + t

        if dv is not None:
            add(ScanByWeights.apply(dv, x, out, dim, reverse))
        if dx is not None:
            add(result * dx if reverse else ScanByWeights.apply(v * dx, x, out, dim, False))
        if dout is not None:
            add(-ScanByWeights.apply(v * dout, x, out, dim, True) if reverse else -result * dout)
        return total if total is not None else torch.zeros_like(result)


class LogCumSumExp(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, dim):
        return torch.logcumsumexp(x, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.dim = inputs
        ctx.save_for_backward(x, output)
        ctx.save_for_forward(x, output)

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        if x.dim() == 0:
            return grad, None
        # d x_i = sum_{j >= i} grad_j exp(x_i - out_j)
        return ScanByWeights.apply(grad, x, out, ctx.dim, True), None

    @staticmethod
    def jvp(ctx, tangent, _dim):
        x, out = ctx.saved_tensors
        if x.dim() == 0:
            return tangent
        # d out_j = sum_{i <= j} exp(x_i - out_j) tangent_i
        return ScanByWeights.apply(tangent, x, out, ctx.dim, False)


def _logcumsumexp(x, dim, *, out=None):
    if (out is not None or not isinstance(x, LevelTensor) or not isinstance(dim, int)
            or not x.is_floating_point()):
        return torch.logcumsumexp(x, dim, out=out)
    return LogCumSumExp.apply(x, dim)


def _det(A, *, out=None):
    # Plain tensors (a Function's forward, run below every level) keep torch's det.
    if out is not None or not isinstance(A, LevelTensor) or A.dim() < 2:
        return torch.linalg.det(A, out=out)
    return Determinant.apply(A)


# torch API function -> our replacement (same signature).
OWN_DERIVATIVES = {
    torch.linalg.det: _det,
    torch.det: _det,
    torch.Tensor.det: _det,
    torch.logcumsumexp: _logcumsumexp,
    torch.Tensor.logcumsumexp: _logcumsumexp,
}


class _OwnDerivativesMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        replacement = OWN_DERIVATIVES.get(func)
        if replacement is not None:
            return replacement(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


_own_derivatives_active = one_mode_while_held(_OwnDerivativesMode)


def own_derivatives_for(level):
    """The context under which ``level`` runs the user's function: the mode of NOTE [Ops
    whose torch backward breaks at higher order] when a level below ``level`` differentiates."""
    for below in level_stack()[:level.depth]:
        if below.alive and below.kind in ("grad", "jvp"):
            return _own_derivatives_active()
    return contextlib.nullcontext()
