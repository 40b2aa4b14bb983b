"""Linear solves and determinants.

torch's forward formulas for these ops reuse the LU factors the op returns. Those outputs
are not differentiable, so a grad level below that records the formula would treat them as
constants and differentiate it wrongly (grad(jvp(linalg.solve)) off by the dependence of
LU on A); and torch has one forward-AD level, so a second jvp level could only get them
through the general fallback's double-vjp trick, which breaks at third order. These rules
instead write each tangent with the op itself (one more factorisation), which every level
below can differentiate, batch, or serve with these same rules again.
"""
import torch

from ..registry import fit_tangent, jvp_rule

aten = torch.ops.aten


def _is_vector_rhs(A, B):
    # torch's linalg_solve_is_vector_rhs: B of shape A.shape[:-1] (or 1-D) is a batch of vectors.
    return B.dim() == 1 or (B.dim() == A.dim() - 1 and B.shape == A.shape[:-1])


@jvp_rule(aten._linalg_solve_ex.default)
def linalg_solve_ex(func, primals, tangents, kwargs):
    A, B = primals[:2]
    tA, tB = tangents[:2]
    out = func(*primals, **kwargs)
    X = out[0]
    left = kwargs.get("left", True)
    # AX = B  =>  A dX = dB - dA X   (X A = B  =>  dX A = dB - X dA).
    vector = _is_vector_rhs(A, B)
    rhs = None
    if tA is not None:
        X_ = X.unsqueeze(-1) if vector else X
        prod = tA @ X_ if left else X_ @ tA
        rhs = -(prod.squeeze(-1) if vector else prod)
    if tB is not None:
        rhs = tB if rhs is None else rhs + tB
    if rhs is None:
        return out, None
    if rhs.shape != X.shape:
        rhs = rhs.expand(X.shape)
    dX = func(A, rhs, left=left)[0]
    return out, (fit_tangent(dX, X), None, None, None)


def _trace_inv_times(A, E, singular):
    """trace(A^-1 E), with A replaced by the identity where ``singular`` (NaN-free there,
    so levels below that differentiate it see no NaN from the branch where() drops)."""
    if singular is not None:
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        A = torch.where(singular[..., None, None], eye, A)
    Y = aten._linalg_solve_ex.default(A, E)[0]
    return Y.diagonal(0, -2, -1).sum(-1)


def det_tangent(A, det, tangent):
    """d det = det * trace(A^-1 dA). torch's formula gives 0 at a singular A (det == 0
    times a finite value from an eps-regularised LU), so does this."""
    singular = det == 0
    t = det * _trace_inv_times(A, tangent, singular)
    return torch.where(singular, torch.zeros_like(t), t)


@jvp_rule(aten._linalg_det.default)
def linalg_det(func, primals, tangents, kwargs):
    out = func(*primals, **kwargs)
    det = out[0]
    return out, (fit_tangent(det_tangent(primals[0], det, tangents[0]), det), None, None)


@jvp_rule(aten._linalg_slogdet.default)
def linalg_slogdet(func, primals, tangents, kwargs):
    A = primals[0]
    out = func(*primals, **kwargs)
    sign, logabsdet = out[:2]
    # d log|det| = Re trace(A^-1 dA); for complex A, d sign = i Im trace(A^-1 dA) sign.
    tr = _trace_inv_times(A, tangents[0], None)
    if A.is_complex():
        t_sign = sign * (1j * tr.imag)
        t_logabsdet = tr.real
    else:
        t_sign = None
        t_logabsdet = tr
    return out, (fit_tangent(t_sign, sign), fit_tangent(t_logabsdet, logabsdet), None, None)


@jvp_rule(aten.linalg_householder_product.default)
def householder_product(func, primals, tangents, kwargs):
    V_in, tau = primals[:2]
    dV_in, dtau = tangents[:2]
    out = func(*primals, **kwargs)
    m, n = V_in.shape[-2:]
    k = tau.shape[-1]
    # Q = (H_1 ... H_k)[:, :n] with H_i = I - tau_i v_i v_i^H; the op reads only the strictly
    # lower triangle of V and takes v_i's i-th entry as 1. The product rule, term by term:
    # dQ = sum_i H_1..H_{i-1} dH_i H_{i+1}..H_k[:, :n]. torch's own formula reads the
    # output, which levels below would differentiate as if it did not depend on V and tau.
    eye = torch.eye(m, dtype=V_in.dtype, device=V_in.device)
    V = V_in.tril(-1) + eye[:, :n]
    dV = None if dV_in is None else dV_in.tril(-1)
    vs = [V[..., :, i:i + 1] for i in range(k)]
    taus = [tau[..., i, None, None] for i in range(k)]
    H = [eye - t * (v @ v.mH) for v, t in zip(vs, taus)]
    suffix = [None] * k
    acc = eye[:, :n]
    for i in reversed(range(k)):
        suffix[i] = acc
        acc = H[i] @ acc
    prefix = None
    dQ = None
    for i in range(k):
        v, t = vs[i], taus[i]
        dH = None
        if dtau is not None:
            dH = -dtau[..., i, None, None] * (v @ v.mH)
        if dV is not None:
            dv = dV[..., :, i:i + 1]
            term = t * (dv @ v.mH + v @ dv.mH)
            dH = -term if dH is None else dH - term
        term = dH @ suffix[i] if prefix is None else prefix @ (dH @ suffix[i])
        dQ = term if dQ is None else dQ + term
        prefix = H[i] if prefix is None else prefix @ H[i]
    return out, fit_tangent(dQ, out)
