"""vmap: the public batching transform, its in_dims/out_dims handling and chunking."""
import functools
import threading

import torch

from ..batching.fallback import note_nested_loop
from ..batching.interpreter import BatchedTensor, VmapInterpreter
from ..core.wrapper import LevelTensor
from .pytree import broadcast_to_and_flatten, structure_repr, tree_flatten, tree_unflatten

_RANDOMNESS = ("error", "different", "same")


class _CallRepr:
    """``vmap(f, in_dims=..., out_dims=...)(<inputs>)`` for error messages, built only when
    a message is (reprs of in_dims on every call would be a measurable cost)."""

    __slots__ = ("func", "in_dims", "out_dims", "moved")

    def __init__(self, func, in_dims, out_dims):
        self.func, self.in_dims, self.out_dims = func, in_dims, out_dims
        self.moved = None

    def __format__(self, spec):
        name = getattr(self.func, "__name__", repr(self.func))
        return f"vmap({name}, in_dims={self.in_dims!r}, out_dims={self.out_dims!r})(<inputs>)"


def _flat_in_dims_fast(in_dims, args):
    """in_dims for the common call: every argument a Tensor and in_dims an int or a flat
    tuple of ints/None. Returns None when the general pytree path is needed."""
    for a in args:
        if not isinstance(a, torch.Tensor):
            return None
    if isinstance(in_dims, int):
        return [in_dims] * len(args)
    if type(in_dims) is tuple and len(in_dims) == len(args) and all(
        d is None or type(d) is int for d in in_dims
    ):
        return list(in_dims)
    return None


def _flatten_in_dims(func, in_dims, out_dims, args):
    call = _CallRepr(func, in_dims, out_dims)
    flat_in_dims = _flat_in_dims_fast(in_dims, args)
    if flat_in_dims is not None:
        return _check_batch_sizes(call, list(args), flat_in_dims, None)
    if not isinstance(in_dims, (int, tuple)) and in_dims is not None:
        raise ValueError(
            f"{call}: expected `in_dims` to be int or a (potentially nested) tuple matching "
            f"the structure of the inputs, got {type(in_dims).__name__}."
        )
    if isinstance(in_dims, tuple) and len(in_dims) != len(args):
        raise ValueError(
            f"{call}: in_dims is not compatible with the structure of `inputs`: in_dims has "
            f"{len(in_dims)} entries but {len(args)} positional argument(s) were passed. Give "
            f"one in_dim per positional argument."
        )
    flat_args, args_spec = tree_flatten(args)
    flat_in_dims = broadcast_to_and_flatten(in_dims, args_spec)
    if flat_in_dims is None:
        raise ValueError(
            f"{call}: in_dims is not compatible with the structure of `inputs`. in_dims must "
            f"be a prefix of the inputs' pytree structure {structure_repr(args_spec)}."
        )
    return _check_batch_sizes(call, flat_args, flat_in_dims, args_spec)


def _check_batch_sizes(call, flat_args, flat_in_dims, args_spec):
    batch_sizes = []
    nested = False
    for arg, in_dim in zip(flat_args, flat_in_dims):
        if in_dim is None:
            continue
        if not isinstance(in_dim, int):
            raise ValueError(f"{call}: in_dims must contain only ints and None, got {in_dim!r}.")
        if isinstance(arg, torch.Tensor) and arg.is_nested:
            if in_dim != 0:
                raise RuntimeError(
                    f"{call}: Nested tensors can only be vmapped over dim=0 (their components), "
                    f"got in_dim={in_dim}."
                )
            nested = True
            batch_sizes.append(arg.size(0))
            continue
        if not isinstance(arg, torch.Tensor):
            raise ValueError(
                f"{call}: Got in_dim={in_dim} for an input but the input is of type "
                f"{type(arg).__name__}. vmap can only map over Tensors; use None as the in_dim "
                f"of non-Tensor inputs."
            )
        if not -arg.dim() <= in_dim < arg.dim():
            raise ValueError(
                f"{call}: Got in_dim={in_dim} for some input, but that input is a Tensor of "
                f"dimensionality {arg.dim()}; in_dim must satisfy {-arg.dim()} <= in_dim < "
                f"{arg.dim()}."
            )
        batch_sizes.append(arg.size(in_dim))
    if not batch_sizes:
        if not flat_args:
            raise ValueError(
                f"{call}: got no inputs. Pass at least one Tensor to map over (a function of "
                f"no inputs has nothing to vmap)."
            )
        raise ValueError(
            f"{call}: at least one Tensor must be mapped over, but all in_dims were None or no "
            f"Tensor was passed. Give a Tensor input an integer in_dim."
        )
    if any(b != batch_sizes[0] for b in batch_sizes):
        raise ValueError(
            f"{call}: Expected all tensors to have the same size in the mapped dimension, got "
            f"sizes {batch_sizes} for the mapped inputs. Map over dimensions of one size, or "
            f"pass the odd input with in_dim None."
        )
    return flat_args, flat_in_dims, args_spec, batch_sizes[0], nested


def _unbatch_output(level, out, out_dim, batch_size, call):
    if out_dim is None:
        if isinstance(out, LevelTensor) and out._level is level:
            raise ValueError(
                f"{call}: out_dims is None for an output that depends on the mapped inputs (vmap "
                f"can not return a BatchedTensor when out_dim is None). Only outputs that are the "
                f"same for every example can use out_dims=None."
            )
        return out
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"{call}: `f` must only return Tensors, got type {type(out)}. Set its out_dim to "
            f"None to return it unbatched."
        )
    if not -(out.dim() + 1) <= out_dim < out.dim() + 1:
        # IndexError, as torch.func's (it comes from movedim there).
        raise IndexError(
            f"{call}: Dimension out of range: out_dim={out_dim} is out of range for an output "
            f"with {out.dim()} dims per example (expected {-(out.dim() + 1)} <= out_dim < "
            f"{out.dim() + 1})."
        )
    if isinstance(out, LevelTensor) and out._level is level:
        value = out._value
    else:
        value = out.unsqueeze(0).expand(batch_size, *out.shape)
    if out_dim == 0:
        return value
    if call.moved:
        original, in_dim = call.moved.get(id(value), (None, None))
        if original is not None and in_dim == out_dim % value.dim():
            return original
    return value.movedim(0, out_dim)


def _valid_out_dims(out_dims):
    if out_dims is None or type(out_dims) is int:
        return True
    if isinstance(out_dims, (tuple, list)):
        return all(_valid_out_dims(d) for d in out_dims)
    if isinstance(out_dims, dict):
        return all(_valid_out_dims(d) for d in out_dims.values())
    return False


def vmap(func, in_dims=0, out_dims=0, randomness="error", *, chunk_size=None, axis_name=None):
    """Map ``func`` over dimension ``in_dims`` of its inputs, as if it ran once per example.

    ``axis_name`` names the mapped axis for the collectives (``ft.psum(x, axis_name)``, ...)
    called inside ``func``, as in JAX's vmap.

    >>> x = torch.randn(3, 5)
    >>> vmap(torch.dot)(x, x).shape
    torch.Size([3])
    """
    if randomness not in _RANDOMNESS:
        raise RuntimeError(
            f"vmap: randomness must be one of {_RANDOMNESS}, got {randomness!r}."
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(
            f"vmap: chunk_size should be None or greater than 0. Got {chunk_size!r}: pass a "
            f"positive int, or None to run the whole batch at once."
        )
    if axis_name is not None:
        if isinstance(axis_name, (tuple, list)):
            raise ValueError(
                f"vmap: axis_name must be a single name (a str or other hashable), got "
                f"{axis_name!r}; nest vmaps to map over several named axes."
            )
        try:
            hash(axis_name)
        except TypeError:
            raise TypeError(
                f"vmap: axis_name must be hashable (a str, say), got {type(axis_name).__name__}."
            ) from None
        if chunk_size is not None:
            raise ValueError(
                "vmap: chunk_size cannot be combined with axis_name: a collective would only "
                "see the examples of one chunk. Drop chunk_size, or reduce over the chunks' "
                "results outside vmap."
            )

    if not _valid_out_dims(out_dims):
        raise ValueError(
            f"vmap({getattr(func, '__name__', func)}, in_dims={in_dims!r}, "
            f"out_dims={out_dims!r}): `out_dims` must be an int, None or a python collection of "
            f"ints (nested like the outputs) saying where in each output the mapped dimension "
            f"goes."
        )

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if getattr(_nested_loop, "active", False):
            raise RuntimeError(
                f"vmap: vmap called inside a vmap over nested tensors (Only one level of vmap "
                f"is supported when mapping over nested tensors). Map over the nested tensor "
                f"in the innermost vmap only."
            )
        flat_args, flat_in_dims, args_spec, batch_size, nested = _flatten_in_dims(
            func, in_dims, out_dims, args
        )
        if nested:
            return _vmap_nested(func, flat_args, flat_in_dims, args_spec, kwargs, batch_size,
                                in_dims, out_dims)
        if chunk_size is None or chunk_size >= batch_size:
            return _vmap_once(func, flat_args, flat_in_dims, args_spec, kwargs, batch_size,
                              in_dims, out_dims, randomness, axis_name)
        return _vmap_chunked(func, flat_args, flat_in_dims, args_spec, kwargs, batch_size,
                             in_dims, out_dims, randomness, chunk_size)

    return wrapper


def _vmap_once(func, flat_args, flat_in_dims, args_spec, kwargs, batch_size, in_dims,
               out_dims, randomness, axis_name=None):
    call = _CallRepr(func, in_dims, out_dims)
    with VmapInterpreter(batch_size, randomness, axis_name) as level:
        batched = [
            a if d is None else BatchedTensor(a.movedim(d, 0) if d != 0 else a, level)
            for a, d in zip(flat_args, flat_in_dims)
        ]
        if any(d for d in flat_in_dims):
            # An input returned as is, with out_dim equal to its in_dim, comes back as the
            # very tensor passed in (torch.func keeps the batch dim where it was).
            call.moved = {id(b._value): (a, d % a.dim()) for a, b, d in
                          zip(flat_args, batched, flat_in_dims) if d}
        if level.axis is not None:
            level.axis.device = next(
                a.device for a, d in zip(flat_args, flat_in_dims) if d is not None
            )
        # args_spec is None when every argument was a Tensor (see _flat_in_dims_fast).
        inputs = batched if args_spec is None else tree_unflatten(batched, args_spec)
        output = func(*inputs, **kwargs)
        if isinstance(output, torch.Tensor):
            if type(out_dims) is int:
                return _unbatch_output(level, output, out_dims, batch_size, call)
            if type(out_dims) is tuple and len(out_dims) == 1:
                # torch.func accepts out_dims=(d,) for a function returning one Tensor.
                return _unbatch_output(level, output, out_dims[0], batch_size, call)
        flat_out, out_spec = tree_flatten(output)
        flat_out_dims = broadcast_to_and_flatten(out_dims, out_spec)
        if flat_out_dims is None:
            raise ValueError(
                f"{call}: out_dims is not compatible with the structure of `outputs`. out_dims "
                f"must be a prefix of the outputs' pytree structure {structure_repr(out_spec)}."
            )
        results = [
            _unbatch_output(level, o, d, batch_size, call) for o, d in zip(flat_out, flat_out_dims)
        ]
    return tree_unflatten(results, out_spec)


# NOTE [vmap over nested tensors]: the examples of a nested tensor have different shapes,
# which no BatchedTensor can describe; as in torch.func (whose fallback does the same),
# ``f`` runs once per component on dense tensors and the results are nested again.
_nested_loop = threading.local()


def _vmap_nested(func, flat_args, flat_in_dims, args_spec, kwargs, batch_size, in_dims,
                 out_dims):
    call = _CallRepr(func, in_dims, out_dims)
    for arg, d in zip(flat_args, flat_in_dims):
        if d not in (None, 0):
            raise RuntimeError(
                f"{call}: an input mapped over dim {d} next to nested tensors (Fallback not "
                f"supported for mixed nested / non-nested arguments without bdim=0). Map every "
                f"input over dim 0."
            )
    note_nested_loop()
    examples = [None if d is None else arg.unbind(0) for arg, d in zip(flat_args, flat_in_dims)]
    outputs = []
    _nested_loop.active = True
    try:
        for i in range(batch_size):
            flat = [arg if ex is None else ex[i] for arg, ex in zip(flat_args, examples)]
            outputs.append(func(*(flat if args_spec is None else tree_unflatten(flat, args_spec)),
                                **kwargs))
    finally:
        _nested_loop.active = False
    flat_outputs = [tree_flatten(o)[0] for o in outputs]
    out_spec = tree_flatten(outputs[0])[1]
    flat_out_dims = broadcast_to_and_flatten(out_dims, out_spec)
    if flat_out_dims is None:
        raise ValueError(
            f"{call}: out_dims is not compatible with the structure of `outputs`. out_dims must "
            f"be a prefix of the outputs' pytree structure {structure_repr(out_spec)}."
        )
    if any(d not in (None, 0) for d in flat_out_dims):
        raise RuntimeError(
            f"{call}: Nested tensors can only be vmapped over dim=0: their results are nested "
            f"tensors of one component per example. Use out_dims=0."
        )
    results = [
        outs[0] if d is None else torch.nested.as_nested_tensor(list(outs))
        for d, outs in zip(flat_out_dims, zip(*flat_outputs))
    ]
    return tree_unflatten(results, out_spec)


def _vmap_chunked(func, flat_args, flat_in_dims, args_spec, kwargs, batch_size, in_dims,
                  out_dims, randomness, chunk_size):
    starts = range(0, batch_size, chunk_size)
    chunk_outputs = []
    # 'same' shares one draw between every example, so every chunk must draw it again from
    # the same generator state (as torch.func does, for the default CPU generator).
    rng_state = torch.get_rng_state() if randomness == "same" else None
    for start in starts:
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        length = min(chunk_size, batch_size - start)
        chunk_args = [
            a if d is None else a.narrow(d, start, length) for a, d in zip(flat_args, flat_in_dims)
        ]
        chunk_outputs.append(
            _vmap_once(func, chunk_args, flat_in_dims, args_spec, kwargs, length, in_dims,
                       out_dims, randomness)
        )
    _, out_spec = tree_flatten(chunk_outputs[0])
    flat_out_dims = broadcast_to_and_flatten(out_dims, out_spec)
    flat_chunks = [tree_flatten(c)[0] for c in chunk_outputs]
    merged = []
    for i, d in enumerate(flat_out_dims):
        pieces = [c[i] for c in flat_chunks]
        merged.append(pieces[0] if d is None else torch.cat(pieces, dim=d))
    return tree_unflatten(merged, out_spec)
