"""The slow path: running an op once per example and stacking the results.

Every use is counted (``functransforms.fallback_counts()``) and the first use of each op
warns, so a user can see which ops cost them a Python loop.
"""
import warnings


_counts = {}
_warned = set()


def op_name(func):
    return f"{func._schema.name.split('::')[-1]}.{func._overloadname}"


def fallback_counts():
    """``{aten op name: times vmap ran it with the per-example loop}`` since start."""
    return dict(_counts)


def reset_fallback_counts():
    _counts.clear()


def note_fallback(func):
    _note(op_name(func), f"there is no batching rule for aten::{op_name(func)}, so it runs")


def note_nested_loop():
    """vmap over nested tensors runs the whole function once per component."""
    _note("<nested tensor inputs>", "nested tensor inputs are mapped over by running the "
          "function")


def _note(name, what):
    _counts[name] = _counts.get(name, 0) + 1
    if name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"vmap: {what} once per example in a Python loop. Results are correct but slow.",
            stacklevel=3,
        )
