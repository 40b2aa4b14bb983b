"""functional_call: run a module with some of its parameters and buffers replaced."""
from torch.nn.utils.stateless import _reparametrize_module


def _merge_dicts(parameter_and_buffer_dicts):
    if isinstance(parameter_and_buffer_dicts, dict):
        return parameter_and_buffer_dicts
    if not isinstance(parameter_and_buffer_dicts, (list, tuple)):
        raise ValueError(
            f"functional_call: expected parameter_and_buffer_dicts to be a dict or a list/tuple "
            f"of dicts, got {type(parameter_and_buffer_dicts).__name__}."
        )
    merged = {}
    repeated = []
    for d in parameter_and_buffer_dicts:
        if not isinstance(d, dict):
            raise ValueError(
                f"functional_call: expected every element of parameter_and_buffer_dicts to be a "
                f"dict, got {type(d).__name__}."
            )
        for k, v in d.items():
            if k in merged and k not in repeated:
                repeated.append(k)
            merged[k] = v
    if repeated:
        raise ValueError(
            f"functional_call: {repeated} appear in more than one of the dicts; which value to "
            f"use is ambiguous. Give each name exactly once."
        )
    return merged


def functional_call(module, parameter_and_buffer_dicts, args=None, kwargs=None, *,
                    tie_weights=True, strict=False):
    """Call ``module(*args, **kwargs)`` with the given tensors in place of its own.

    Names not in the dicts keep the module's tensors. With ``tie_weights`` a value given for
    one name of a tied pair is used for every name sharing that tensor; with ``strict``
    every parameter and buffer must be given and no unknown name may appear. The module's
    own tensors are back in place when this returns, also when the call raises.
    """
    tensors = _merge_dicts(parameter_and_buffer_dicts)
    if args is None:
        args = ()
    elif not isinstance(args, tuple):
        args = (args,)
    with _reparametrize_module(module, tensors, tie_weights=tie_weights, strict=strict):
        return module(*args, **(kwargs or {}))
