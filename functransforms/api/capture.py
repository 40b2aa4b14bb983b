"""capture: run a transformed function once per input signature, then replay its aten ops.

NOTE [Capture and replay]
Every level ends in plain aten calls on plain tensors (NOTE [How one op travels] in
core/wrapper.py). The Python work above them (wrappers, interpreters, autograd on the
wrappers) decides *which* plain calls run, and for a fixed input signature a pure tensor
function always decides the same way. ``capture`` records that decision once:
  * the first call with a new signature runs eagerly under ``_Recorder``, a dispatch mode
    that sits below every transform's mode. Ops on wrappers pass through it to their level
    (with the recorder pushed back, so the plain ops they lower to reach it too); plain
    ops are executed and appended to a tape of ``(op, args, kwargs)`` whose tensor
    arguments are slots: an input, an earlier op's output, or a constant captured by
    reference (a module's parameter, a buffer, a tensor built from Python numbers);
  * later calls with that signature run the tape on the new inputs: no wrappers, no
    levels, no Python per op beyond the loop itself. Ops whose values neither the result
    nor a write nor a random draw depends on (jacrev's primal output) are left out of the
    tape; writes and random draws always stay, so inputs, buffers and the random stream
    change as eagerly.
What is baked in is what a tracing JIT bakes in: Python control flow, Python numbers
(including any read from tensors without an op, as ``.tolist()`` and ``.numpy()`` do) and
the identity of captured tensors (their values are read at replay time, so in-place
updates of parameters are seen). Random ops draw anew on every replay. The recording call
keeps every tensor it sees alive until it returns, so its peak memory is higher than an
eager call's.
A call the tape cannot stand for runs eagerly every time instead: inputs that require grad
(torch autograd around the call), data-dependent Python values (``.item()``, ``nonzero``),
or a result that did not come out of a recorded op.
"""
import functools
import operator
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..core.wrapper import LevelTensor
from .pytree import flatten_tensors

_MAX_SIGNATURES = 16
_DATA_DEPENDENT = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)
# Ops returning Python values computed from metadata alone, which the signature fixes.
_METADATA_ONLY = frozenset(
    {"aten::result_type", "aten::is_same_size", "aten::_has_compatible_shallow_copy_type"}
)


def _data_dependent(func, args):
    if func is torch.ops.aten.index.Tensor:
        # Only a boolean mask makes the result's shape depend on values.
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return any(tag in func.tags for tag in _DATA_DEPENDENT)


class _Slot:
    """A tensor argument of a taped op: the value in slot ``index`` at replay time."""

    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index


class _Recorder(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls):
        return False

    def __init__(self, inputs):
        super().__init__()
        self.slot_of = {}  # id(tensor) -> slot index
        self.alive = []  # every tensor seen, so no id is reused while recording
        self.constants = {}  # slot index -> tensor captured by reference
        self.steps = []
        self.failure = None
        for t in inputs:
            self._slot(t)

    def _slot(self, t):
        index = self.slot_of.get(id(t))
        if index is None:
            index = self.slot_of[id(t)] = len(self.alive)
            self.alive.append(t)
        return index

    def _template(self, a):
        if isinstance(a, torch.Tensor):
            if id(a) not in self.slot_of:
                self.constants[self._slot(a)] = a
            return _Slot(self.slot_of[id(a)])
        if type(a) in (list, tuple):
            return type(a)(self._template(b) for b in a)
        return a

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_flatten((args, kwargs))[0]
        if any(isinstance(t, LevelTensor) for t in leaves):
            # What the dispatcher would have done without this mode, with the recorder
            # back on the stack for the ops the level lowers this one to.
            with self:
                return LevelTensor.__torch_dispatch__(func, types, args, kwargs)
        out = func(*args, **kwargs)
        if self.failure is None:
            self._record(func, args, kwargs, leaves, out)
        return out

    def _record(self, func, args, kwargs, leaves, out):
        if _data_dependent(func, args):
            self.failure = f"{func._schema.name} has a data-dependent result"
            return
        out_leaves = tree_flatten(out)[0]
        if func._schema.name not in _METADATA_ONLY and any(
            not isinstance(o, torch.Tensor) and o is not None for o in out_leaves
        ):
            self.failure = f"{func._schema.name} returned a Python value"
            return
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves + out_leaves):
            self.failure = (
                f"{func._schema.name} saw a tensor that requires grad (torch autograd "
                f"around the call)"
            )
            return
        step_args = self._template(args)
        step_kwargs = {k: self._template(v) for k, v in kwargs.items()}
        if isinstance(out, torch.Tensor):
            outs = self._slot(out)
        elif isinstance(out, (tuple, list)):
            outs = tuple(self._slot(o) if isinstance(o, torch.Tensor) else None for o in out)
        else:
            outs = None  # None, or a metadata value nothing later reads from the tape
        self.steps.append((func, step_args, step_kwargs, outs))


class _Tape:
    """The recorded ops of one signature, ready to run on new inputs."""

    def __init__(self, recorder, num_inputs, out_slots, rebuild_output, out_constants):
        self.num_inputs = num_inputs
        self.num_slots = len(recorder.alive)
        self.out_slots = out_slots
        self.rebuild_output = rebuild_output
        self.out_constants = out_constants
        steps = _live_steps(recorder.steps, out_slots)
        # Free each intermediate after its last use, as eager execution would.
        last_use = {}
        for i, (_, a, k, _) in enumerate(steps):
            for s in _slots_in((a, k)):
                last_use[s] = i
        self.constants = [(index, t) for index, t in recorder.constants.items()
                          if index in last_use or index in out_slots]
        keep = set(out_slots) | set(range(num_inputs)) | set(recorder.constants)
        frees = [[] for _ in steps]
        for s, i in last_use.items():
            if s not in keep:
                frees[i].append(s)
        self.recorded = steps
        self.steps = [
            (op._op, *_compile_args(a, k), outs, tuple(f))
            for (op, a, k, outs), f in zip(steps, frees)
        ]

    def to_graph(self, inputs, constants_as_inputs):
        """The tape as an FX graph, without its output node: ``(graph, attrs, nodes)``.

        ``inputs`` names one placeholder per leaf of the call, ``(name, is_tensor)``; the
        tensor ones stand for the tape's input slots in order. Captured constants become
        placeholders after them (``constants_as_inputs``) or ``get_attr`` nodes whose
        tensors ``attrs`` holds by reference. ``nodes`` maps every slot to its node.
        """
        graph = torch.fx.Graph()
        nodes, attrs = {}, {}
        for name, is_tensor in inputs:
            node = graph.placeholder(name)
            if is_tensor:
                nodes[len(nodes)] = node
        for k, (index, t) in enumerate(self.constants):
            name = f"_constant{k}"
            if constants_as_inputs:
                nodes[index] = graph.placeholder(name)
            else:
                attrs[name] = t
                nodes[index] = graph.get_attr(name)

        def arg(a):
            kind = type(a)
            if kind is _Slot:
                return nodes[a.index]
            if kind is tuple or kind is list:
                return kind(arg(b) for b in a)
            return a

        for func, a, k, outs in self.recorded:
            if func._schema.name in _METADATA_ONLY:
                continue  # its Python result is already baked into the ops that read it
            node = graph.create_node("call_function", func, arg(a),
                                     {n: arg(v) for n, v in k.items()},
                                     name=func._schema.name.split("::")[-1])
            if type(outs) is int:
                nodes[outs] = node
            elif outs is not None:
                for i, slot in enumerate(outs):
                    if slot is not None:
                        nodes[slot] = graph.call_function(operator.getitem, (node, i))
        return graph, attrs, nodes

    def run(self, inputs):
        env = [None] * self.num_slots
        env[:self.num_inputs] = inputs
        for index, t in self.constants:
            env[index] = t
        for op, args, direct, nested, kwargs, kw_slots, outs, frees in self.steps:
            if direct or nested:
                args = list(args)
                for position, slot in direct:
                    args[position] = env[slot]
                for position, template in nested:
                    args[position] = _fill(template, env)
            if kw_slots:
                kwargs = dict(kwargs)
                for name, template in kw_slots:
                    kwargs[name] = _fill(template, env)
            out = op(*args, **kwargs)
            if type(outs) is int:
                env[outs] = out
            elif outs is not None:
                for s, o in zip(outs, out):
                    if s is not None:
                        env[s] = o
            for s in frees:
                env[s] = None
        leaves = [env[s] if s is not None else c for s, c in zip(self.out_slots, self.out_constants)]
        return self.rebuild_output(leaves)


def _live_steps(steps, out_slots):
    """The steps a replay needs: those writing into a tensor or drawing random numbers
    (their effects are seen), and those computing a tensor that a result or such a step
    reads. A transform often computes values nothing reads (jacrev's primal output, a
    forward value only its backward would need): eager execution runs them, a replay
    need not."""
    live = set(out_slots)
    kept = []
    for step in reversed(steps):
        func, a, k, outs = step
        produced = (outs,) if type(outs) is int else outs or ()
        if (func._schema.is_mutable or torch.Tag.nondeterministic_seeded in func.tags
                or outs is None or any(s in live for s in produced)):
            kept.append(step)
            live.update(_slots_in((a, k)))
    kept.reverse()
    return kept


def _compile_args(args, kwargs):
    """Split a step's argument templates so that a replay fills only the slots: positional
    slots directly, slots inside lists through ``_fill``; the rest stays as recorded."""
    direct = tuple((i, a.index) for i, a in enumerate(args) if type(a) is _Slot)
    nested = tuple(
        (i, a) for i, a in enumerate(args) if type(a) is not _Slot and _has_slot(a)
    )
    kw_slots = tuple((k, v) for k, v in kwargs.items() if _has_slot(v))
    return tuple(args), direct, nested, kwargs, kw_slots


def _fill(a, env):
    kind = type(a)
    if kind is _Slot:
        return env[a.index]
    if kind is tuple or kind is list:
        return kind(_fill(b, env) for b in a)
    return a


def _has_slot(a):
    return any(True for _ in _slots_in(a))


def _slots_in(a):
    if type(a) is _Slot:
        yield a.index
    elif type(a) in (list, tuple):
        for b in a:
            yield from _slots_in(b)
    elif type(a) is dict:
        for b in a.values():
            yield from _slots_in(b)


def _flatten_call(args, kwargs):
    """``(leaves, structure)`` of a call's arguments. The usual call (Tensors and dicts of
    Tensors, no kwargs) skips torch's pytree walk, which costs more than a small replay."""
    if not kwargs:
        leaves, structure = [], []
        for a in args:
            if isinstance(a, torch.Tensor):
                leaves.append(a)
                structure.append(None)
            elif type(a) is dict and all(isinstance(v, torch.Tensor) for v in a.values()):
                leaves.extend(a.values())
                structure.append(tuple(a))
            else:
                break
        else:
            return leaves, tuple(structure)
    return tree_flatten((args, kwargs))


def _unflatten_call(leaves, structure):
    if type(structure) is not tuple:
        return tree_unflatten(leaves, structure)
    args, start = [], 0
    for keys in structure:
        if keys is None:
            args.append(leaves[start])
            start += 1
        else:
            args.append(dict(zip(keys, leaves[start:start + len(keys)])))
            start += len(keys)
    return tuple(args), {}


def _signature(leaves, spec):
    """A hashable key for what the tape depends on, or None when the call can't be taped."""
    key = [spec, torch.is_grad_enabled()]
    storages = {}
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if type(leaf) is not torch.Tensor or leaf.requires_grad:
                return None
            storage = storages.setdefault(leaf.untyped_storage().data_ptr(), len(storages))
            key.append((tuple(leaf.shape), leaf.stride(), leaf.storage_offset(), leaf.dtype,
                        leaf.device, storage))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            key.append((type(leaf), leaf))
    return tuple(key)


def _unrecordable(leaves):
    """Why a call cannot be recorded (``_signature`` said None): the reason, in words."""
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if type(leaf) is not torch.Tensor:
                return f"an input is a tensor subclass ({type(leaf).__name__})"
            if leaf.requires_grad:
                return ("an input requires grad (torch autograd around the call needs the "
                        "eager ops; pass detached inputs to record)")
        else:
            try:
                hash(leaf)
            except TypeError:
                return f"an argument is not hashable ({type(leaf).__name__})"
    return None


def capture(func, *, backend=None, mode=None, options=None):
    """``func`` recorded once per input signature and replayed as plain aten ops.

    For transformed functions whose Python dispatch overhead dominates (small models,
    per-sample gradients at small batch): ``capture(vmap(grad(loss)))``. ``func`` must be a
    pure function of its tensor inputs, as for a tracing JIT: see NOTE [Capture and replay]
    for what is baked in and which calls run eagerly instead.

    ``backend`` (any ``torch.compile`` backend name, e.g. ``"inductor"``; ``mode`` and
    ``options`` are passed on to ``torch.compile``) runs each signature's recording as one
    compiled FX graph instead of replaying it op by op: see NOTE [Compiled capture].
    """
    tapes = {}
    warned = []  # falling back to eager execution is a slow path: say so once per function
    compiler = None
    if backend is not None:
        compiler = _compiler(backend, mode, options)
    elif mode is not None or options is not None:
        raise ValueError("capture: mode and options are torch.compile's; pass a backend too")

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        leaves, spec = _flatten_call(args, kwargs)
        key = _signature(leaves, spec)
        if key is None:
            if not warned:
                warned.append(True)
                _warn_eager(func, _unrecordable(leaves))
            return func(*args, **kwargs)
        tape = tapes.get(key)
        if tape is not None:
            if tape is _EAGER:
                return func(*args, **kwargs)
            with torch.no_grad():
                return tape.run([t for t in leaves if isinstance(t, torch.Tensor)])
        if len(tapes) >= _MAX_SIGNATURES:
            if not warned:
                warned.append(True)
                _warn_eager(func, f"it was already recorded for {_MAX_SIGNATURES} input "
                                  f"signatures (shapes, dtypes, argument values)")
            return func(*args, **kwargs)
        result, tape, failure = _record(func, args, kwargs, leaves, spec)
        if failure is not None and not warned:
            warned.append(True)
            _warn_eager(func, failure)
        if compiler is not None and tape is not _EAGER:
            tape = _CompiledTape(tape, func, compiler)
        tapes[key] = tape
        return result

    return wrapper


def _compiler(backend, mode, options):
    """The ``(graph_module, example_inputs) -> callable`` that ``torch.compile(backend=...,
    mode=..., options=...)`` would hand its graphs to (an unknown backend name raises here)."""
    if backend == "inductor":
        return torch._TorchCompileInductorWrapper(mode, options, False)
    return torch._TorchCompileWrapper(backend, mode, options, False)


class _CompiledTape:
    """One signature's recording as an FX graph compiled by a ``torch.compile`` backend.

    NOTE [Compiled capture]
    ``capture(f, backend=...)`` records exactly as plain capture does (NOTE [Capture and
    replay]): same signatures, same calls that run eagerly, same limit of signatures. A
    recording becomes an FX graph whose inputs are the call's tensors followed by the
    captured constants (so their values, not copies, are read at every call, and in-place
    updates of parameters are seen), and whose outputs are the results the ops computed
    (returned inputs and constants are handed back as themselves). The first call with a
    signature records eagerly; the second hands the graph and its inputs straight to the
    backend's compiler, as ``torch.compile(backend=..., mode=..., options=..., dynamic=False)``
    would after tracing (the compile time is paid there, once per signature); every call
    runs the compiled program under ``no_grad``. No dynamo frame sits around it: the
    signature key is already the guard dynamo would check, so a call costs the compiled
    program plus capture's own lookup, not dynamo's guards on every tensor. What dynamo's
    guards would also catch, a captured constant whose shape, strides, dtype or device
    changed since the compile, sends that call to the op-by-op replay. On top of what capture
    bakes in, the backend may fuse and reorder floating-point work, so results can differ
    from eager ones in the last bits; random ops draw anew on each call, from the backend's
    own stream (inductor's differs from eager's). In-place writes into inputs and buffers
    reach them. If the backend fails on a graph, that signature is replayed op by op, with
    a warning.
    """

    def __init__(self, tape, func, compiler):
        self.tape = tape
        self.func = func
        self.compiler = compiler
        constant_slots = {index: t for index, t in tape.constants}
        self.constants = list(constant_slots.values())
        self.constant_layout = _layout(self.constants)
        # Each result leaf: ("graph", None) from the compiled outputs in order, ("input", i),
        # or ("value", v) for a captured constant or a non-tensor.
        self.sources, computed = [], []
        for slot, value in zip(tape.out_slots, tape.out_constants):
            if slot is None:
                self.sources.append(("value", value))
            elif slot < tape.num_inputs:
                self.sources.append(("input", slot))
            elif slot in constant_slots:
                self.sources.append(("value", constant_slots[slot]))
            else:
                self.sources.append(("graph", None))
                computed.append(slot)
        inputs = [(f"input{i}", True) for i in range(tape.num_inputs)]
        graph, _, nodes = tape.to_graph(inputs, constants_as_inputs=True)
        graph.output(tuple(nodes[s] for s in computed))
        self.graph_module = torch.fx.GraphModule({}, graph)
        self.compiled = None

    def run(self, inputs):
        if _layout(self.constants) != self.constant_layout:  # as recorded, and compiled
            return self.tape.run(inputs)
        compiled = self.compiled
        if compiled is None:
            return self._first_run(inputs)
        outs = iter(compiled(*inputs, *self.constants))
        leaves = [next(outs) if kind == "graph" else inputs[v] if kind == "input" else v
                  for kind, v in self.sources]
        return self.tape.rebuild_output(leaves)

    def _first_run(self, inputs):
        try:
            self.compiled = self.compiler(self.graph_module, [*inputs, *self.constants])
            return self.run(inputs)
        except Exception as e:  # the backend's failure, at compile time or on the first run
            self.run = self.tape.run  # from now on, for this signature
            e = getattr(e, "inner_exception", None) or e  # inductor wraps the real error
            backend = self.compiler.compiler_name
            name = getattr(self.func, "__name__", repr(self.func))
            message = str(e).strip().splitlines()
            warnings.warn(
                f"capture({name}, backend={backend!r}): "
                f"compiling failed ({type(e).__name__}: {message[0] if message else ''}); "
                f"replaying the recorded ops for this signature instead.", stacklevel=4)
            return self.tape.run(inputs)


def _layout(tensors):
    return [(t.shape, t.stride(), t.storage_offset(), t.dtype, t.device) for t in tensors]


_EAGER = object()


def _warn_eager(func, reason):
    name = getattr(func, "__name__", repr(func))
    warnings.warn(f"capture({name}): runs eagerly on calls it cannot replay: {reason}.",
                  stacklevel=3)


def _write_back_metadata(pairs):
    """In-place shape changes (``t_``, ``resize_``) of an input alias reach the caller's
    tensor, as they would have without the alias."""
    for alias, original in pairs:
        if (alias.shape != original.shape or alias.stride() != original.stride()
                or alias.storage_offset() != original.storage_offset()
                or alias.untyped_storage().data_ptr() != original.untyped_storage().data_ptr()):
            with torch.no_grad():
                original.set_(alias)


def _record(func, args, kwargs, leaves, spec):
    # The function sees fresh aliases of its tensor inputs, so a tensor it also reads by
    # closure (the very object passed in) is told apart from the input and stays a constant.
    pairs = []
    aliased = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            pairs.append((leaf.detach(), leaf))
            aliased.append(pairs[-1][0])
        else:
            aliased.append(leaf)
    originals = {id(alias): original for alias, original in pairs}
    inputs = [alias for alias, _ in pairs]
    recorder = _Recorder(inputs)
    args, kwargs = _unflatten_call(aliased, spec)
    try:
        with recorder:
            result = func(*args, **kwargs)
    finally:
        _write_back_metadata(pairs)
    recorded_leaves, rebuild = flatten_tensors(result)
    # An input handed back is the caller's own tensor, as in an eager call.
    result = rebuild(
        [originals.get(id(o), o) if isinstance(o, torch.Tensor) else o for o in recorded_leaves]
    )
    if recorder.failure is not None:
        return result, _EAGER, recorder.failure
    out_slots, out_constants = [], []
    for o in recorded_leaves:
        if isinstance(o, torch.Tensor):
            index = recorder.slot_of.get(id(o))
            if index is None or type(o) is not torch.Tensor:
                return result, _EAGER, "a result does not come out of a recorded op"
            out_slots.append(index)
            out_constants.append(None)
        else:
            out_slots.append(None)
            out_constants.append(o)
    return result, _Tape(recorder, len(inputs), out_slots, rebuild, out_constants), None
