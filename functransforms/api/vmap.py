"""vmap: the public batching transform, its in_dims/out_dims handling and chunking."""
import functools

import torch

from ..batching.interpreter import BatchedTensor, VmapInterpreter
from ..core.wrapper import LevelTensor
from .pytree import broadcast_to_and_flatten, structure_repr, tree_flatten, tree_unflatten

_RANDOMNESS = ("error", "different", "same")


class _CallRepr:
    """``vmap(f, in_dims=..., out_dims=...)(<inputs>)`` for error messages, built only when
    a message is (reprs of in_dims on every call would be a measurable cost)."""

    __slots__ = ("func", "in_dims", "out_dims")

    def __init__(self, func, in_dims, out_dims):
        self.func, self.in_dims, self.out_dims = func, in_dims, out_dims

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
            f"{call}: expected `in_dims` to be an int or a (potentially nested) tuple matching "
            f"the structure of the inputs, got {type(in_dims).__name__}."
        )
    if isinstance(in_dims, tuple) and len(in_dims) != len(args):
        raise ValueError(
            f"{call}: in_dims has {len(in_dims)} entries but {len(args)} positional "
            f"argument(s) were passed. Give one in_dim per positional argument."
        )
    flat_args, args_spec = tree_flatten(args)
    flat_in_dims = broadcast_to_and_flatten(in_dims, args_spec)
    if flat_in_dims is None:
        raise ValueError(
            f"{call}: in_dims is not compatible with the structure of the inputs. in_dims must "
            f"be a prefix of the inputs' pytree structure {structure_repr(args_spec)}."
        )
    return _check_batch_sizes(call, flat_args, flat_in_dims, args_spec)


def _check_batch_sizes(call, flat_args, flat_in_dims, args_spec):
    batch_sizes = []
    for arg, in_dim in zip(flat_args, flat_in_dims):
        if in_dim is None:
            continue
        if not isinstance(in_dim, int):
            raise ValueError(f"{call}: in_dims must contain only ints and None, got {in_dim!r}.")
        if not isinstance(arg, torch.Tensor):
            raise ValueError(
                f"{call}: got in_dim={in_dim} for an input of type {type(arg).__name__}. vmap can "
                f"only map over Tensors; use None as the in_dim of non-Tensor inputs."
            )
        if not -arg.dim() <= in_dim < arg.dim():
            raise ValueError(
                f"{call}: got in_dim={in_dim} for an input with {arg.dim()} dims; in_dim must "
                f"satisfy {-arg.dim()} <= in_dim < {arg.dim()}."
            )
        batch_sizes.append(arg.size(in_dim))
    if not batch_sizes:
        raise ValueError(
            f"{call}: at least one input must be a Tensor mapped over (all in_dims were None "
            f"or no Tensor was passed)."
        )
    if any(b != batch_sizes[0] for b in batch_sizes):
        raise ValueError(
            f"{call}: expected every mapped input to have the same size in its mapped dimension, "
            f"got sizes {batch_sizes}."
        )
    return flat_args, flat_in_dims, args_spec, batch_sizes[0]


def _unbatch_output(level, out, out_dim, batch_size, call):
    if out_dim is None:
        if isinstance(out, LevelTensor) and out._level is level:
            raise ValueError(
                f"{call}: out_dims is None for an output that depends on the mapped inputs. "
                f"Only outputs that are the same for every example can use out_dims=None."
            )
        return out
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"{call}: `f` must only return Tensors, got {type(out).__name__}. Set its out_dim "
            f"to None to return it unbatched."
        )
    if not -(out.dim() + 1) <= out_dim < out.dim() + 1:
        raise ValueError(
            f"{call}: out_dim={out_dim} is out of range for an output with {out.dim()} dims "
            f"per example."
        )
    if isinstance(out, LevelTensor) and out._level is level:
        value = out._value
    else:
        value = out.unsqueeze(0).expand(batch_size, *out.shape)
    return value if out_dim == 0 else value.movedim(0, out_dim)


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
        raise ValueError(f"vmap: chunk_size must be a positive int or None, got {chunk_size!r}.")
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

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        flat_args, flat_in_dims, args_spec, batch_size = _flatten_in_dims(
            func, in_dims, out_dims, args
        )
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
        if level.axis is not None:
            level.axis.device = next(
                a.device for a, d in zip(flat_args, flat_in_dims) if d is not None
            )
        # args_spec is None when every argument was a Tensor (see _flat_in_dims_fast).
        inputs = batched if args_spec is None else tree_unflatten(batched, args_spec)
        output = func(*inputs, **kwargs)
        if isinstance(output, torch.Tensor) and type(out_dims) is int:
            return _unbatch_output(level, output, out_dims, batch_size, call)
        flat_out, out_spec = tree_flatten(output)
        flat_out_dims = broadcast_to_and_flatten(out_dims, out_spec)
        if flat_out_dims is None:
            raise ValueError(
                f"{call}: out_dims is not compatible with the structure of the outputs. out_dims "
                f"must be a prefix of the outputs' pytree structure {structure_repr(out_spec)}."
            )
        results = [
            _unbatch_output(level, o, d, batch_size, call) for o, d in zip(flat_out, flat_out_dims)
        ]
    return tree_unflatten(results, out_spec)


def _vmap_chunked(func, flat_args, flat_in_dims, args_spec, kwargs, batch_size, in_dims,
                  out_dims, randomness, chunk_size):
    starts = range(0, batch_size, chunk_size)
    chunk_outputs = []
    for start in starts:
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
