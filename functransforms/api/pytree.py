"""Pytree helpers shared by the public transforms."""
import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten, _broadcast_to_and_flatten

from ..core.wrapper import LevelTensor

__all__ = ["tree_flatten", "tree_map", "tree_unflatten", "broadcast_to_and_flatten",
           "unwrap_tree", "flatten_tensors", "map_tensors", "normalize_argnums", "select_args",
           "structure_repr", "split_aux", "check_outputs", "type_name"]


def broadcast_to_and_flatten(prefix, spec):
    return _broadcast_to_and_flatten(prefix, spec)


def flatten_tensors(tree):
    """``(leaves, rebuild)`` with ``rebuild(leaves)`` giving the tree back.

    The shapes transforms meet on every call (a Tensor; a plain dict, list or tuple of
    Tensors such as a parameter dict) skip torch's pytree walk, which costs several µs per
    leaf; anything else takes it.
    """
    if isinstance(tree, torch.Tensor):
        return [tree], _only_leaf
    kind = type(tree)
    if kind is dict and all(isinstance(v, torch.Tensor) for v in tree.values()):
        keys = list(tree)
        return list(tree.values()), lambda leaves: dict(zip(keys, leaves))
    if (kind is tuple or kind is list) and all(isinstance(v, torch.Tensor) for v in tree):
        return list(tree), kind
    leaves, spec = tree_flatten(tree)
    return leaves, lambda new_leaves: tree_unflatten(new_leaves, spec)


def _only_leaf(leaves):
    return leaves[0]


def map_tensors(fn, tree):
    """``tree_map(fn, tree)``, fast for the shapes ``flatten_tensors`` knows."""
    leaves, rebuild = flatten_tensors(tree)
    return rebuild([fn(x) for x in leaves])


def unwrap_tree(tree, level):
    """Replace each of ``level``'s wrappers in ``tree`` by its value one level down."""
    def unwrap(x):
        if isinstance(x, LevelTensor) and x._level is level:
            return x._value
        return x
    if tree is None:
        return None
    return map_tensors(unwrap, tree)


def normalize_argnums(argnums, num_args, api):
    # Each refusal also carries torch.func's wording, so code matching its messages still works.
    if isinstance(argnums, int):
        argnums_tuple = (argnums,)
    elif isinstance(argnums, tuple):
        if not argnums:
            raise RuntimeError(
                f"{api}: argnums must be non-empty: pass an int or a tuple of at least one int."
            )
        argnums_tuple = argnums
    else:
        raise RuntimeError(
            f"{api}: argnums must be int or Tuple[int, ...] (an int or a non-empty tuple of "
            f"ints), got {argnums!r}."
        )
    normalized = []
    for a in argnums_tuple:
        if not isinstance(a, int):
            raise RuntimeError(
                f"{api}: each argnum must be int, got {a!r} of type {type(a).__name__} in "
                f"argnums={argnums!r}."
            )
        if not -num_args <= a < num_args:
            raise RuntimeError(
                f"{api}: got argnum={a}, but only {num_args} positional inputs were given. "
                f"Each argnum must satisfy {-num_args} <= argnum < {num_args}."
            )
        normalized.append(a % num_args)
    if len(set(normalized)) != len(normalized):
        raise RuntimeError(
            f"{api}: argnums elements must be unique, got argnums={argnums!r}, which names the "
            f"same argument twice."
        )
    return normalized


def select_args(args, argnums):
    return tuple(args[i] for i in argnums)


class _Leaf:
    def __repr__(self):
        return "*"


def structure_repr(spec):
    """A pytree structure as users write it, leaves shown as ``*``: ``(*, [*, *])``."""
    return repr(tree_unflatten([_Leaf()] * spec.num_leaves, spec))


def type_name(x):
    # Users never see our wrapper classes: a wrapper is a Tensor to them.
    return "Tensor" if isinstance(x, torch.Tensor) else type(x).__name__


def split_aux(result, has_aux, call):
    """``(output, aux)`` of a function called with ``has_aux``; ``call`` names the user's call
    in the error message (``grad_and_value(f)(*args)``)."""
    if not has_aux:
        return result, None
    if not (isinstance(result, tuple) and len(result) == 2):
        raise RuntimeError(
            f"{call}: output of function f should be a tuple: (output, aux) if has_aux is "
            f"True, got {type_name(result)}."
        )
    output, aux = result
    for leaf in tree_flatten(aux)[0]:
        if not isinstance(leaf, torch.Tensor):
            raise RuntimeError(
                f"{call}: the aux output of f must be a pytree of Tensors. Expected tensors, got "
                f"unsupported type {type(leaf)}. Return Python values through a closure or a "
                f"global instead."
            )
    return output, aux


def check_outputs(flat_out, call, what="f(*primals)"):
    """f's flattened outputs must be a non-empty list of Tensors (torch.func's rule)."""
    if not flat_out or (len(flat_out) == 1 and flat_out[0] is None):
        raise RuntimeError(
            f"{call}: Expected f to be a function that has non-empty output (got an output "
            f"with no Tensors). Return at least one Tensor."
        )
    for o in flat_out:
        if not isinstance(o, torch.Tensor):
            raise RuntimeError(
                f"{call}: expected {what} to return only tensors, got unsupported type "
                f"{type_name(o)}."
            )
