"""What every workload shares: interleaved timing, result tables, optional peers, checks.

NOTE [interleaved medians]
The benchmark machine is shared, so its load drifts over seconds. Every implementation of
one configuration is timed in the same process, in rounds: each round times every
implementation for about the same wall-clock slice, and the order rotates from round to
round. A load spike therefore lands on all implementations alike, and the median over all
calls of all rounds discards the spikes themselves. Calls are timed in CPU time of the
process (see ``_one_call``); compile times, in wall-clock time.
"""
import importlib
import os
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import functransforms as ft

OURS = "functransforms"
ORACLE = "torch.func"
CAPTURED = "functransforms capture"
COMPILED = "functransforms compiled"
TF_COMPILED = "torch.compile(torch.func)"
# The torch.compile backend of both compiled columns; run.py sets it (--compile-backend,
# "eager" in quick mode, where compiling with inductor would take minutes).
COMPILE_BACKEND = "inductor"
# (numerator, denominator) pairs whose per-round ratio every row reports when both ran.
PAIRED = ((CAPTURED, ORACLE), (COMPILED, ORACLE), (COMPILED, TF_COMPILED))


@dataclass
class Settings:
    quick: bool
    rounds: int = 5
    # Wall-clock seconds each implementation gets per configuration, split over the rounds.
    budget_s: float = 1.0


@dataclass
class Row:
    config: str
    values: dict  # implementation -> seconds (or MiB); None when it did not run
    notes: list = field(default_factory=list)
    ratio: float = None  # functransforms / torch.func, paired round by round
    ratios: dict = field(default_factory=dict)  # PAIRED -> ratio, paired round by round
    compile_s: dict = field(default_factory=dict)  # implementation -> first-call seconds
    levels: int = 1  # transform levels, for per-op-and-level overhead


@dataclass
class Table:
    key: str  # file-name stem of its plot
    title: str
    config_label: str
    impls: list
    unit: str = "ms"
    scale: float = 1e3  # seconds -> unit
    loop: str = None  # the implementation "speedup over loop" is measured against
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    # config -> zero-argument callables running functransforms / torch.func, for profiling.
    profile_targets: dict = field(default_factory=dict)
    reference_targets: dict = field(default_factory=dict)
    extra_columns: list = field(default_factory=list)  # (header, row -> str)


class Unavailable(Exception):
    """An implementation that cannot run here: a peer not installed or an API not there yet."""


def ft_api(name):
    """``functransforms.<name>``, or Unavailable while that transform is not implemented yet."""
    fn = getattr(ft, name, None)
    if fn is None:
        raise Unavailable(f"functransforms has no `{name}` yet")
    return fn


_peers = {}


def peer(module):
    """Import an optional peer (jax, opacus) once; Unavailable with the install hint if absent."""
    if module not in _peers:
        if module == "jax":
            # Single-threaded like torch here, so the comparison is per core, not per machine.
            os.environ.setdefault(
                "XLA_FLAGS",
                "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
            )
        try:
            _peers[module] = importlib.import_module(module)
        except ImportError as err:
            _peers[module] = Unavailable(f"{module} is not installed ({err}); see the README's Benchmarks section")
    found = _peers[module]
    if isinstance(found, Unavailable):
        raise found
    return found


def peer_versions():
    versions = {}
    for name in ("jax", "opacus"):
        try:
            versions[name] = peer(name).__version__
        except Unavailable:
            versions[name] = "not installed"
    return versions


def compiled_builders(ours, theirs, args, no_grad=False):
    """The captured, compiled and ``torch.compile(torch.func)`` implementations of one
    transformed program: ``ours()`` / ``theirs()`` build the functransforms / torch.func
    function, called on ``args``. The compiled ones warm up in their builder (capture
    records on its first call and compiles on its second), and ``thunk.compile_s`` is
    how long that took, so the timed calls never include compilation."""
    def bind(fn, warm_calls):
        def thunk():
            return fn(*args)
        if no_grad:
            thunk = torch.no_grad()(thunk)
        t0 = time.perf_counter()
        for _ in range(warm_calls):
            thunk()
        thunk.compile_s = time.perf_counter() - t0 if warm_calls else None
        return thunk

    # torch.func's transforms share their wrappers' code objects, so every configuration
    # compiled here counts as a recompile of the same frames; past dynamo's default limit (8)
    # torch.compile would silently run the torch.func program eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return {
        CAPTURED: lambda: bind(ft_api("capture")(ours()), 1),
        COMPILED: lambda: bind(ft_api("capture")(ours(), backend=COMPILE_BACKEND), 2),
        TF_COMPILED: lambda: bind(torch.compile(theirs(), backend=COMPILE_BACKEND), 1),
    }


def build(builders, notes):
    """Call each ``name -> () -> thunk`` builder; skipped ones leave a note instead."""
    impls = {}
    for name, make in builders.items():
        try:
            impls[name] = make()
        except Unavailable as why:
            note = f"{name}: skipped, {why}."
            if note not in notes:
                notes.append(note)
    return impls


def _one_call(fn):
    # CPU time of this process, not wall-clock time: every implementation runs on one
    # thread, and on a loaded machine wall-clock time also counts the waits for a core,
    # which grow with a call's length (a long call is preempted more often than a short
    # one), so wall-clock ratios of unequal calls drift with the load.
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def compare(impls, settings, notes):
    """Time every implementation of one configuration, interleaved (see NOTE above).

    Returns ``(medians, outputs, per_round)``: ``{name: median seconds or None}``, the
    output of each first call, and ``{name: [median of each round it ran in]}``. An
    implementation that raises is reported in ``notes`` and gets None. One slower than
    twice its budget runs once in each of the first few rounds only, at least once.
    """
    outputs, estimate = {}, {}
    for name, fn in impls.items():
        try:
            t0 = time.perf_counter()
            outputs[name] = fn()  # first call: compilation, caches, lazy imports
            first = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001  (a failing implementation is a result)
            notes.append(f"{name}: failed with {type(err).__name__}: {str(err)[:200]}")
            continue
        if not settings.quick:
            estimate[name] = first if first > settings.budget_s else _one_call(fn)
    live = [n for n in impls if n in outputs]
    if settings.quick:
        times = {n: _one_call(impls[n]) if n in live else None for n in impls}
        return times, outputs, {n: [t] for n, t in times.items() if t is not None}
    calls = {n: settings.budget_s / max(estimate[n], 1e-7) for n in live}
    samples = {n: [] for n in live}
    per_round = {n: [] for n in live}
    for r in range(settings.rounds):
        for n in live[r % len(live):] + live[:r % len(live)]:
            if calls[n] >= 0.5:
                reps = max(1, int(calls[n] / settings.rounds))
            else:
                reps = 1 if r < max(1, int(2 * calls[n] * settings.rounds)) else 0
            if reps:
                got = [_one_call(impls[n]) for _ in range(reps)]
                samples[n] += got
                per_round[n].append(statistics.median(got))
    medians = {n: statistics.median(samples[n]) if n in samples else None for n in impls}
    return medians, outputs, per_round


def paired_ratio(per_round, num, den):
    """Median over rounds of num/den, each from the same round: robust to load drift."""
    pairs = [a / b for a, b in zip(per_round.get(num, []), per_round.get(den, [])) if b]
    return statistics.median(pairs) if pairs else None


def to_numpy(tree):
    """Flatten a (nested) dict/tuple/list of torch or jax arrays to a list of numpy arrays."""
    if isinstance(tree, dict):
        return [a for k in sorted(tree) for a in to_numpy(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [a for x in tree for a in to_numpy(x)]
    if isinstance(tree, torch.Tensor):
        return [tree.detach().numpy()]
    return [np.asarray(tree)]


def check_outputs(outputs, reference, notes, checked=None, rtol=1e-4, atol=1e-5):
    """Compare outputs with torch.func's (all, or those ``checked``); a mismatch is a note."""
    if reference not in outputs:
        return
    ref = to_numpy(outputs[reference])
    for name, out in outputs.items():
        if checked is not None and name not in checked:
            continue
        got = to_numpy(out)
        same = len(got) == len(ref) and all(
            g.shape == r.shape and np.allclose(g, r, rtol=rtol, atol=atol) for g, r in zip(got, ref)
        )
        if not same:
            notes.append(f"{name}: output differs from {reference} (shapes or values)")


def add_row(table, config, builders, settings, checked=None):
    """Build, check and time one configuration of ``table``; returns the Row."""
    row = Row(config, {})
    impls = build(builders, table.notes)
    times, outputs, per_round = compare(impls, settings, row.notes)
    check_outputs(outputs, ORACLE, row.notes, checked)
    row.values = {name: times.get(name) for name in table.impls}
    row.ratio = paired_ratio(per_round, OURS, ORACLE)
    for num, den in PAIRED:
        if num in impls and den in impls:
            row.ratios[(num, den)] = paired_ratio(per_round, num, den)
    row.compile_s = {name: fn.compile_s for name, fn in impls.items()
                     if getattr(fn, "compile_s", None) is not None}
    table.rows.append(row)
    if OURS in impls and ORACLE in impls:
        table.profile_targets[config] = impls[OURS]
        table.reference_targets[config] = impls[ORACLE]
    return row
