"""Collectives over named axes (NOTE [Named axes] in core/collectives.py).

psum and all_gather are linear: the tangent goes through the same collective. pmax/pmin
pass on the tangent of the examples that attain the extremum, shared evenly among ties,
as torch's amax does; the sums that needs are collectives over the same axis.
"""
from ...core.collectives import OPS
from ..registry import jvp_rule

_psum = OPS["psum"]


@jvp_rule(OPS["psum"], OPS["all_gather"])
def linear(func, primals, tangents, kwargs):
    out = func(*primals)
    t = tangents[0]
    return out, None if t is None else func(t, *primals[1:])


@jvp_rule(OPS["pmax"], OPS["pmin"])
def extremum(func, primals, tangents, kwargs):
    x, axis_id = primals
    out = func(x, axis_id)
    t = tangents[0]
    if t is None:
        return out, None
    mask = (x == out).to(t.dtype)
    return out, _psum(t * mask, axis_id) / _psum(mask, axis_id)
