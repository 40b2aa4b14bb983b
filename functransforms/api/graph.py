"""make_graph: a transformed function's aten program as an FX GraphModule (our make_jaxpr).

``make_graph(f)(*args)`` records ``f`` once, exactly as the first call of ``capture(f)``
does (NOTE [Capture and replay] in api/capture.py), and returns the recording as a
``torch.fx.GraphModule``: one placeholder per leaf of the call's arguments, one node per
plain aten op the tape keeps (those the result, a write or a random draw depends on), the
result's structure rebuilt at the end. ``gm.code`` and
``gm.print_readable()`` show it; ``gm(*args)`` runs it on new inputs of the same
signature. Tensors the function reads besides its inputs (a module's parameters, constants
built from Python numbers) are attributes of the module, held by reference. The recording
call runs ``f`` for real, side effects included (in-place writes, buffer updates).
Calls ``capture`` would run eagerly have no graph: ``make_graph`` raises, saying why.
"""
import functools
import inspect
import re

import torch
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils._pytree import tree_flatten, tree_flatten_with_path

from .capture import _flatten_call, _record, _signature, _unrecordable


def make_graph(func):
    """``make_graph(f)(*args, **kwargs)``: the GraphModule of the aten ops ``f`` runs on
    these arguments (see the module docstring for what it holds and what it bakes in)."""
    name = getattr(func, "__name__", type(func).__name__)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        leaves, spec = _flatten_call(args, kwargs)
        if _signature(leaves, spec) is None:
            _refuse(name, _unrecordable(leaves))
        _, tape, failure = _record(func, args, kwargs, leaves, spec)
        if failure is not None:
            _refuse(name, failure)
        arg_names = _argument_names(func, len(args), kwargs)
        call = (tuple(args), kwargs) if kwargs else list(args)
        paths, in_spec = tree_flatten_with_path(call)
        graph, attrs, nodes = tape.to_graph(
            _placeholders(paths, arg_names, len(args), bool(kwargs)), constants_as_inputs=False
        )
        out_leaves = [nodes[s] if s is not None else c
                      for s, c in zip(tape.out_slots, tape.out_constants)]
        out_spec = tree_flatten(tape.rebuild_output(list(range(len(out_leaves)))))[1]
        graph.output(out_leaves)
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(arg_names, in_spec, out_spec))
        return torch.fx.GraphModule(attrs, graph, class_name=_identifier(name) or "Graph")

    return wrapper


def _refuse(name, reason):
    raise RuntimeError(
        f"make_graph({name}): this call is not one fixed program of aten ops, so it has no "
        f"graph: {reason}. capture({name}) would run such calls eagerly; for a graph, call "
        f"it on inputs that avoid this."
    )


def _argument_names(func, num_args, kwargs):
    """The names of ``func``'s positional parameters (through ``functools.wraps``), or
    ``arg0, arg1, ...``, followed by the keyword arguments' names."""
    names = None
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= num_args:
        names = positional[:num_args]
    if names is None or set(names) & set(kwargs):
        names = [f"arg{i}" for i in range(num_args)]
    return names + list(kwargs)


def _placeholders(paths, arg_names, num_args, has_kwargs):
    """``(name, is_tensor)`` per leaf: its argument's name and its path inside it
    (``params_fc1_weight``), made unique from the arguments' own names."""
    taken = set(arg_names)
    out = []
    for path, leaf in paths:
        if has_kwargs:
            group, path = path[0].idx, path[1:]
            head = path[0]
            base = arg_names[head.idx] if group == 0 else head.key
        else:
            head = path[0]
            base = arg_names[head.idx]
        rest = "_".join(re.sub(r"\W+", "_", str(_key(k))).strip("_") for k in path[1:])
        name = f"{base}_{rest}" if rest else base
        candidate, n = name, 1
        while candidate in taken:
            candidate = f"{name}_{n}"
            n += 1
        taken.add(candidate)
        out.append((candidate, isinstance(leaf, torch.Tensor)))
    return out


def _key(k):
    for field in ("key", "idx", "name"):
        if hasattr(k, field):
            return getattr(k, field)
    return k


def _identifier(text):
    text = re.sub(r"\W+", "_", text).strip("_")
    return text if not text[:1].isdigit() else f"_{text}"
