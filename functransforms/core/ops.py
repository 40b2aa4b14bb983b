"""Facts about aten ops that every interpreter's choice of handler relies on."""
import torch
from torch._decomp import decomposition_table

aten = torch.ops.aten


def functional_twin(func):
    """``aten.add.Tensor`` for ``aten.add_.Tensor``: the out-of-place op with the same schema."""
    name = func._schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    if packet is None:
        return None
    wanted = [(a.name, str(a.type)) for a in func._schema.arguments]
    twin = getattr(packet, func._overloadname, None)
    if twin is not None and [(a.name, str(a.type)) for a in twin._schema.arguments] == wanted:
        return twin
    # Overload names do not always match (transpose_.default vs transpose.int), or match an
    # overload with other arguments (pow_.Scalar takes a Scalar exponent, pow.Scalar a
    # Scalar base): look for the overload taking the same arguments.
    for overload in packet.overloads():
        candidate = getattr(packet, overload)
        if [(a.name, str(a.type)) for a in candidate._schema.arguments] == wanted:
            return candidate
    return None


def twin_call(func, twin):
    """``twin`` as a callable taking ``func``'s arguments as dispatch hands them over.

    Dispatch drops trailing arguments left at their defaults, and a twin may not share the
    default (``bernoulli_.float(self, float p=0.5)`` vs ``bernoulli.p(self, float p)``): the
    call then fills in ``func``'s defaults for the arguments the twin needs.
    """
    positional = [a for a in func._schema.arguments if not a.kwarg_only]
    twin_positional = [a for a in twin._schema.arguments if not a.kwarg_only]
    if not any(
        a.has_default_value() and not b.has_default_value()
        for a, b in zip(positional, twin_positional)
    ):
        return twin
    defaults = [a.default_value if a.has_default_value() else None for a in positional]

    def call(*args, **kwargs):
        return twin(*args, *defaults[len(args):], **kwargs)

    return call


# torch 2.13's decompositions of these disagree with the kernels: multilabel_margin_loss
# keeps the targets after the first -1, and both give 0-dim and 1-D inputs the wrong shapes
# (tests/test_vmap_nn.py, the margin losses). Levels serve them otherwise.
_WRONG_DECOMPOSITIONS = {
    torch.ops.aten.multilabel_margin_loss_forward.default,
    torch.ops.aten.multi_margin_loss.default,
}


def decomposition(func):
    """A Python decomposition of ``func`` into other aten ops, if torch has one.

    Random ops are never decomposed: their draws must stay one op that randomness handling
    can see.
    """
    if torch.Tag.nondeterministic_seeded in func.tags or func in _WRONG_DECOMPOSITIONS:
        return None
    decomp = decomposition_table.get(func)
    if decomp is not None:
        return _plain_tuple_results(decomp) if len(func._schema.returns) > 1 else decomp
    if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
        return func.decompose
    return None


def decomposition_for_jvp(func):
    """torch's decomposition of a backward op written for forward mode, if it has one.

    The backward kernels of the norms read the saved mean and inverse std; forward mode
    needs their tangents, which torch's forward formulas (and so the general JVP fallback)
    leave out. The JVP decompositions recompute them from the input instead, as torch.func
    does. Imported on first use: torch scripts them at import (about half a second).
    """
    if not func._schema.name.endswith("_backward"):
        return None
    from torch._decomp.decompositions_for_jvp import decomposition_table_for_jvp

    decomp = decomposition_table_for_jvp.get(func)
    if decomp is None:
        return None
    return _plain_tuple_results(decomp) if len(func._schema.returns) > 1 else decomp


def _plain_tuple_results(decomp):
    # torch._decomp returns named tuples (return_types_native_layer_norm) where the op
    # returns a plain tuple; interpreters re-wrap only plain tuples and lists, and a named
    # tuple of lower-level tensors would escape its level unwrapped.
    def run(*args, **kwargs):
        out = decomp(*args, **kwargs)
        return tuple(out) if isinstance(out, tuple) and type(out) is not tuple else out

    return run
