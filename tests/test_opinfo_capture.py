"""OpInfo sweep of ``ft.capture``: a replayed tape must give what eager vmap / vmap(vjp) gives.

Each case of the vmap sweep (tests/opinfo_util.py) runs three ways, each time recorded on
perturbed copies of the inputs and then run on the case's own inputs (new values):
  * captured: ``capture(vmap(fn))``, the tape replayed op by op;
  * graph: the GraphModule of ``make_graph(vmap(fn))``, called;
  * compiled: ``capture(vmap(fn), backend=COMPILE_BACKEND)``, the graph run by
    torch.compile. Compiling costs far more than running, so only each op's first case
    is compiled.
The result is compared with the per-example loop reference, like the eager sweep. A call
that cannot be recorded (data-dependent values) runs eagerly, or for make_graph raises
saying why and the sweep runs it eagerly: such ops count as passing and are listed with the
reason (see NOTE [Capture and replay] in functransforms/api/capture.py).

The default tier checks the vmap sweep's fast subset (captured and graph); ``-m slow`` runs
every op, compiled too, and writes benchmarks/coverage/capture_coverage.md.
"""
import itertools
import pathlib
import warnings

import pytest
import torch

import functransforms as ft
from opinfo_util import OPS_BY_KEY, VMAP_OPS, Transforms, is_random, op_key, run_op, vjp_cases, vmap_cases
from test_opinfo_vmap import FAST_SUBSET

N_SAMPLES = 3
COVERAGE = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "coverage"


# Cheap enough for a sweep of a thousand graphs, and it runs the same AOT functionalization
# inductor does; inductor itself is checked on real workloads in tests/test_graph.py.
COMPILE_BACKEND = "aot_eager"


class _CaptureRecord:
    """Why a call of the current op ran eagerly (None while every call was recorded), and
    whether the backend failed to compile."""
    eager = None
    compile_failed = None


def _perturbed(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x * 1.01
    return x.clone() if isinstance(x, torch.Tensor) else x


def _note_warnings(caught):
    for w in caught:
        message = str(w.message)
        if "runs eagerly" in message and _CaptureRecord.eager is None:
            _CaptureRecord.eager = message.split(": ", 2)[-1]
        if "compiling failed" in message and _CaptureRecord.compile_failed is None:
            _CaptureRecord.compile_failed = message


def captured_vmap(fn, in_dims, backend=None):
    captured = ft.capture(ft.vmap(fn, in_dims=in_dims), backend=backend)

    def run(*args):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            captured(*[_perturbed(a) for a in args])  # records
            out = captured(*args)  # replays (compiles first, with a backend)
        _note_warnings(caught)
        return out

    return run


def compiled_vmap(fn, in_dims):
    return captured_vmap(fn, in_dims, backend=COMPILE_BACKEND)


def graph_vmap(fn, in_dims):
    transformed = ft.vmap(fn, in_dims=in_dims)

    def run(*args):
        try:
            gm = ft.make_graph(transformed)(*[_perturbed(a) for a in args])
        except RuntimeError as e:
            if "has no graph" not in str(e):
                raise
            if _CaptureRecord.eager is None:
                _CaptureRecord.eager = str(e).split("has no graph: ", 1)[1].split(". capture(")[0]
            return transformed(*args)
        return gm(*args)

    return run


EAGER = Transforms(ft.vmap, ft.vjp)
CAPTURED = Transforms(captured_vmap, ft.vjp)
GRAPH = Transforms(graph_vmap, ft.vjp)
COMPILED = Transforms(compiled_vmap, ft.vjp)


def _status(op, make_cases, compiled=False):
    transforms = {"eager": EAGER, "captured": CAPTURED, "graph": GRAPH}
    status, _ = run_op(op, make_cases, transforms)
    if compiled and status["eager"] == "pass":
        # One case: each compiles its own graph.
        first = run_op(op, lambda op: itertools.islice(make_cases(op), 1),
                       {"compiled": COMPILED})[0]
        status.update(first)
    return status


def _vmap_cases(op):
    return vmap_cases(op, N_SAMPLES)


def _vjp_cases(op):
    return vjp_cases(op, N_SAMPLES)


@pytest.mark.parametrize("key", FAST_SUBSET)
def test_capture_fast_subset(key):
    op = OPS_BY_KEY[key]
    for make_cases in (_vmap_cases, _vjp_cases):
        if make_cases is _vjp_cases and not op.supports_autograd:
            continue
        status = _status(op, make_cases)
        if status["eager"] == "pass":
            assert status["captured"] == "pass", status
            assert status["graph"] == "pass", status


MODES = ("captured", "graph", "compiled")


def sweep_op(op):
    """One op's records: ``{op, kind, status, eager, compile_failed}`` per sweep it runs in."""
    records = []
    for kind, make_cases in (("vmap", _vmap_cases), ("vjp", _vjp_cases)):
        if kind == "vjp" and not op.supports_autograd:
            continue
        _CaptureRecord.eager = _CaptureRecord.compile_failed = None
        status = _status(op, make_cases, compiled=True)
        records.append({"op": op_key(op), "kind": kind, "status": status,
                        "eager": _CaptureRecord.eager,
                        "compile_failed": _CaptureRecord.compile_failed})
    return records


def write_coverage(records, path=COVERAGE / "capture_coverage.md"):
    """The coverage table of the ops that pass eagerly; returns ``{kind: counts}``."""
    counts = {kind: {"n": 0, **{m: [0, 0] for m in MODES}} for kind in ("vmap", "vjp")}
    failures, eager_rows, compile_failures = [], [], []
    for r in records:
        status, kind, key = r["status"], r["kind"], r["op"]
        if status["eager"] != "pass":
            continue
        c = counts[kind]
        c["n"] += 1
        for mode in MODES:
            ok = status[mode] == "pass"
            c[mode][0 if ok else 1] += 1
            if not ok:
                failures.append(f"| {key} | {kind} | {mode} | {status[mode]} |")
        if r["eager"] is not None:
            eager_rows.append(f"| {key} | {kind} | {r['eager']} |")
        if r["compile_failed"] is not None:
            compile_failures.append(f"| {key} | {kind} | {r['compile_failed']} |")
    lines = [
        "# ft.capture / ft.make_graph OpInfo coverage (against the per-example loop)",
        "",
        "Every op whose eager vmap (or vmap(vjp)) case passes in the vmap sweep, recorded on "
        "perturbed inputs and run on the case's own: `capture(vmap(f))` replayed op by op, "
        "the GraphModule of `make_graph(vmap(f))` called, and "
        f"`capture(vmap(f), backend=\"{COMPILE_BACKEND}\")` (each op's first case only: every "
        "case compiles its own graph). Calls that cannot be recorded run eagerly (make_graph "
        "raises; the sweep then runs the call eagerly): they pass and are listed below with "
        "the reason. Regenerate with `python -m pytest tests/test_opinfo_capture.py -m slow`.",
        "",
        "| sweep | ops passing eagerly | replayed matches | graph matches | compiled matches "
        "| ran eagerly (not recordable) | compile failed (replayed instead) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, c in counts.items():
        n = c["n"]
        cells = [f"{c[m][0]} ({100 * c[m][0] / max(n, 1):.1f}%)" for m in MODES]
        n_eager = sum(f"| {kind} |" in r for r in eager_rows)
        n_failed = sum(f"| {kind} |" in r for r in compile_failures)
        lines.append(f"| {kind} | {n} | {' | '.join(cells)} | {n_eager} | {n_failed} |")
    lines += ["", "## Mismatches and errors", "", "| op | sweep | mode | status |",
              "|---|---|---|---|", *failures]
    lines += ["", "## Calls that ran eagerly, and why", "", "| op | sweep | reason |",
              "|---|---|---|", *eager_rows]
    lines += ["", "## Graphs the backend could not compile", "", "| op | sweep | warning |",
              "|---|---|---|", *compile_failures]
    path.write_text("\n".join(lines) + "\n")
    return counts, failures


@pytest.mark.slow
def test_capture_full_sweep():
    records = [r for op in VMAP_OPS if not is_random(op, N_SAMPLES) for r in sweep_op(op)]
    counts, failures = write_coverage(records)
    for kind, c in counts.items():
        for mode in MODES:
            assert c[mode][0] == c["n"], (kind, mode, failures)
