"""OpInfo sweep of ``ft.capture``: a replayed tape must give what eager vmap / vmap(vjp) gives.

Each case of the vmap sweep (tests/opinfo_util.py) runs as ``capture(vmap(fn))``: first on
perturbed copies of the inputs (the call that records), then on the case's own inputs (a
replay with new values). The result is compared with the per-example loop reference, like
the eager sweep. An op counts as captured when its first case was replayed rather than run
eagerly (see NOTE [Capture and replay] in functransforms/api/capture.py).

The default tier checks the vmap sweep's fast subset; ``-m slow`` runs every op and writes
benchmarks/coverage/capture_coverage.md.
"""
import pathlib
import warnings

import pytest
import torch

import functransforms as ft
from opinfo_util import OPS_BY_KEY, VMAP_OPS, Transforms, is_random, op_key, run_op, vjp_cases, vmap_cases
from test_opinfo_vmap import FAST_SUBSET

N_SAMPLES = 3
COVERAGE = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "coverage"


class _CaptureRecord:
    """Whether a captured call of the current op fell back to eager execution."""
    eager = False


def _perturbed(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x * 1.01
    return x.clone() if isinstance(x, torch.Tensor) else x


def captured_vmap(fn, in_dims):
    captured = ft.capture(ft.vmap(fn, in_dims=in_dims))

    def run(*args):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            captured(*[_perturbed(a) for a in args])  # records
        if any("runs eagerly" in str(w.message) for w in caught):
            _CaptureRecord.eager = True
        return captured(*args)

    return run


EAGER = Transforms(ft.vmap, ft.vjp)
CAPTURED = Transforms(captured_vmap, ft.vjp)


def _status(op, make_cases):
    status, _ = run_op(op, make_cases, {"eager": EAGER, "captured": CAPTURED})
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


@pytest.mark.slow
def test_capture_full_sweep():
    rows, counts = [], {"vmap": [0, 0, 0, 0], "vjp": [0, 0, 0, 0]}
    for op in VMAP_OPS:
        if is_random(op, N_SAMPLES):
            continue
        for kind, make_cases in (("vmap", _vmap_cases), ("vjp", _vjp_cases)):
            if kind == "vjp" and not op.supports_autograd:
                continue
            _CaptureRecord.eager = False
            status = _status(op, make_cases)
            if status["eager"] != "pass":
                continue
            c = counts[kind]
            c[0] += 1
            if status["captured"] == "pass":
                c[1] += 1
                if _CaptureRecord.eager:
                    c[2] += 1
            else:
                c[3] += 1
                rows.append(f"| {op_key(op)} | {kind} | {status['captured']} |")
    lines = [
        "# ft.capture OpInfo coverage (replay against the per-example loop)",
        "",
        "Every op whose eager vmap (or vmap(vjp)) case passes in the vmap sweep, run as "
        "`capture(vmap(f))`: recorded on perturbed inputs, replayed on the case's own. "
        "Regenerate with `python -m pytest tests/test_opinfo_capture.py -m slow`.",
        "",
        "| sweep | ops passing eagerly | replay matches | of which some case ran eagerly (not capturable) | mismatch / error |",
        "|---|---|---|---|---|",
    ]
    for kind, (n, ok, eager, bad) in counts.items():
        lines.append(f"| {kind} | {n} | {ok} ({100 * ok / max(n, 1):.1f}%) | {eager} | {bad} |")
    lines += ["", "| op | sweep | captured |", "|---|---|---|", *rows]
    (COVERAGE / "capture_coverage.md").write_text("\n".join(lines) + "\n")
    for kind, (n, ok, _, _) in counts.items():
        assert ok == n, (kind, rows)
