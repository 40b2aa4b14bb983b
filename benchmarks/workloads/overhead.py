"""Per-op overhead: each transform around a chain of 20 tiny ops (models.chain).

Times are per op of the chain. The overhead column subtracts the untransformed chain and
divides by the number of transform levels, so it is the price of one op at one level.
"""
import torch
import torch.func as tf

from .harness import ORACLE, OURS, Table, add_row, ft_api
from .models import CHAIN, chain, chain_sum

EAGER = "eager (no transform)"
FLOOR = "dispatch floor"
IMPLS = [OURS, ORACLE, FLOOR, EAGER]


class _Floor(torch.Tensor):
    """The least a transform level written in Python does per op: one ``__torch_dispatch__``
    that unwraps the arguments, runs the op and wraps the result. A grad level also needs
    torch autograd to record on the wrapper, which a leaf that requires grad gives it."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, value, requires_grad=False):
        t = torch.Tensor._make_wrapper_subclass(cls, value.shape, dtype=value.dtype,
                                                device=value.device, requires_grad=requires_grad)
        t._value = value
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        values = [a._value if type(a) is _Floor else a for a in args]
        return _Floor(func._op(*values, **(kwargs or {})))


def _floor(name, x):
    """The floor's version of the row: vmap's one dispatch per op, grad's one per op of the
    forward and of the backward pass; None where it has no one-level counterpart."""
    if name == "vmap":
        wrapped = _Floor(x)
        return lambda: chain(wrapped)._value
    if name == "grad":
        def run():
            leaf = _Floor(x, requires_grad=True)
            return torch.autograd.grad(chain_sum(leaf), leaf)[0]._value
        return run
    return None


def _vmap(lib):
    return lib.vmap(chain)


def _grad(lib):
    return lib.grad(chain_sum)


def _vmap_grad(lib):
    return lib.vmap(lib.grad(chain_sum))


def _jvp(lib):
    ones, jvp = torch.ones(4), lib.jvp
    return lambda x: jvp(chain, (x,), (ones,))


# name -> (transform of a library, number of levels, batched input?)
TRANSFORMS = {
    "vmap": (_vmap, ("vmap",), True),
    "grad": (_grad, ("grad",), False),
    "jvp": (_jvp, ("jvp",), False),
    "vmap(grad)": (_vmap_grad, ("vmap", "grad"), True),
}


class _FtNamespace:
    """``functransforms`` seen through ft_api, so a missing transform is skipped, not an error."""

    def __getattr__(self, name):
        return ft_api(name)


def builders(name):
    transform, _, batched = TRANSFORMS[name]
    x = torch.randn(8, 4) if batched else torch.randn(4)
    eager = chain if name in ("vmap", "jvp") else chain_sum

    def bind(lib):
        def make():
            fn = transform(lib)
            return lambda: fn(x)
        return make

    impls = {OURS: bind(_FtNamespace()), ORACLE: bind(tf), EAGER: lambda: lambda: eager(x)}
    floor = _floor(name, x)
    if floor is not None:
        impls[FLOOR] = lambda: floor
    return impls


def run(settings):
    table = Table(
        key="overhead",
        title=f"Per-op overhead on a chain of {CHAIN} tiny ops (sin, mul on 4 or 8x4 floats)",
        config_label="transform", impls=IMPLS, unit="µs/op", scale=1e6 / CHAIN,
    )
    for name, (_, levels, _) in TRANSFORMS.items():
        row = add_row(table, name, builders(name), settings, checked=[OURS])
        row.levels = len(levels)
    table.notes.append(
        "overhead µs/op/level = (transform - eager) / ops / levels: what one op costs at one "
        "transform level beyond running it, the transform's fixed per-call cost spread over the "
        "ops. Eager runs the chain (grad rows: the chain and a sum) untransformed."
    )

    def per_level(impl):
        def cell(row):
            t, e = row.values.get(impl), row.values.get(EAGER)
            if t is None or e is None:
                return "n/a"
            return f"{(t - e) * table.scale / row.levels:.2f}"
        return cell

    def over_floor(row):
        t, f = row.values.get(OURS), row.values.get(FLOOR)
        return "n/a" if t is None or f is None else f"{t / f:.2f}"

    table.extra_columns = [
        (f"{OURS} overhead µs/op/level", per_level(OURS)),
        (f"{ORACLE} overhead µs/op/level", per_level(ORACLE)),
        (f"{OURS} / {FLOOR}", over_floor),
    ]
    table.notes.append(
        f"{FLOOR}: the chain on a minimal wrapper subclass whose `__torch_dispatch__` unwraps, "
        "runs the op and rewraps (grad row: a leaf that requires grad, then "
        "`torch.autograd.grad`, so torch autograd records on the wrapper as at a grad level): "
        "what any transform level written in Python pays per op.")
    return [table]
