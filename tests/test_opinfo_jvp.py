"""OpInfo sweep of forward mode: ft.jvp against torch.func.jvp on the same inputs.

For every OpInfo with ``supports_forward_ad`` (float64, CPU) and each of its first few
sample inputs, the op is run as a function of the sample's differentiable float tensors
and a random tangent is pushed through it by both transforms. torch.func is the oracle: a
sample it cannot handle is not counted. An op passes when every counted sample matches.
The sweep also records whether ft needed the general fallback (forward/fallback.py) and,
for calibration, how often torch.func itself agrees with a float64 central finite
difference.

The default tier checks a fixed subset; ``-m slow`` runs everything and writes
benchmarks/coverage/jvp_coverage.{md,json}.
"""
import json
import pathlib
import re
import warnings

import pytest
import torch
import torch.func
from torch.testing._internal.common_methods_invocations import op_db
from torch.utils._pytree import tree_flatten, tree_unflatten

import functransforms as ft

N_SAMPLES = 3
FD_EPS = 1e-6
COVERAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "coverage"

JVP_OPS = [
    op for op in op_db if op.supports_forward_ad and torch.float64 in op.supported_dtypes("cpu")
]


def op_key(op):
    return op.name + ("." + op.variant_test_name if op.variant_test_name else "")


OPS_BY_KEY = {op_key(op): op for op in JVP_OPS}

# One or two ops per rule family plus ops that only reach us through decompositions.
FAST_SUBSET = [
    "sin", "exp", "tanh", "sigmoid", "pow", "div.no_rounding_mode", "atan2", "maximum",
    "sum", "mean", "amax", "max.reduction_with_dim", "sort", "var", "prod",
    "mm", "addmm", "bmm", "nn.functional.conv2d",
    "softmax", "log_softmax", "nn.functional.layer_norm", "nn.functional.gelu",
    "cat", "stack", "index_select", "gather", "transpose", "expand", "where", "clamp",
    "nn.functional.pad.constant", "linalg.det",
]


class Unusable(Exception):
    """torch.func cannot run this sample: it says nothing about ft."""


def _is_diff(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad


class _SampleFn:
    """The op applied to a sample, as a function of the sample's differentiable tensors."""

    def __init__(self, op, sample):
        self.op = op
        self.sample = sample
        leaves, self.spec = tree_flatten((sample.input, sample.args, sample.kwargs))
        self.leaves = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]
        self.diff_pos = [i for i, x in enumerate(leaves) if _is_diff(x)]

    def primals(self):
        return tuple(self.leaves[i].clone() for i in self.diff_pos)

    def tangents(self, seed):
        gen = torch.Generator().manual_seed(seed)
        return tuple(
            torch.randn(self.leaves[i].shape, dtype=self.leaves[i].dtype, generator=gen)
            for i in self.diff_pos
        )

    def __call__(self, *diff):
        leaves = list(self.leaves)
        for i, t in zip(self.diff_pos, diff):
            leaves[i] = t
        inp, args, kwargs = tree_unflatten(leaves, self.spec)
        torch.manual_seed(0)  # random ops draw the same numbers on every path
        out = self.op.gradcheck_wrapper(self.op.get_op(), inp, *args, **kwargs)
        out = self.sample.output_process_fn_grad(out)
        return tuple(
            o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.is_floating_point()
        )


def _close(actual, expected, rtol=1e-5, atol=1e-7):
    return len(actual) == len(expected) and all(
        type(a) is torch.Tensor
        and a.shape == e.shape
        and torch.allclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
        for a, e in zip(actual, expected)
    )


def _short(err):
    msg = f"{type(err).__name__}: {err}".splitlines()[0]
    return re.sub(r"0x[0-9a-f]+", "0x?", msg)[:160]


def _finite_difference(fn, primals, tangents):
    plus = fn(*(p + FD_EPS * t for p, t in zip(primals, tangents)))
    minus = fn(*(p - FD_EPS * t for p, t in zip(primals, tangents)))
    return tuple((a - b) / (2 * FD_EPS) for a, b in zip(plus, minus))


def _oracle(fn, idx):
    if not fn.diff_pos:
        raise Unusable("no differentiable input")
    try:
        out, t_out = torch.func.jvp(fn, fn.primals(), fn.tangents(idx))
    except Exception as e:
        raise Unusable(_short(e)) from e
    if not out:
        raise Unusable("no floating point output")
    return out, t_out


def check_op(op, n_samples=N_SAMPLES, with_fd=False):
    """Statuses for ft (vs torch.func) and, optionally, torch.func vs finite differences.

    Returns {'ft': status, 'fallback': bool, 'torch.func_vs_fd': status}; a status is 'pass',
    'skip' (no usable sample) or a failure reason.
    """
    result = {"ft": "skip", "fallback": False, "torch.func_vs_fd": "skip"}
    counted = 0
    for idx, sample in enumerate(op.sample_inputs("cpu", torch.float64, requires_grad=True)):
        if counted == n_samples:
            break
        fn = _SampleFn(op, sample)
        try:
            ref_out, ref_t = _oracle(fn, idx)
        except Unusable:
            continue
        counted += 1
        before = sum(ft.jvp_fallback_counts().values())
        if result["ft"] in ("skip", "pass"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out, t_out = ft.jvp(fn, fn.primals(), fn.tangents(idx))
                if not _close(out, ref_out):
                    result["ft"] = f"sample {idx}: outputs differ"
                elif not _close(t_out, ref_t):
                    result["ft"] = f"sample {idx}: tangents differ"
                else:
                    result["ft"] = "pass"
            except Exception as e:
                result["ft"] = f"sample {idx}: {_short(e)}"
        if sum(ft.jvp_fallback_counts().values()) != before:
            result["fallback"] = True
        if with_fd and result["torch.func_vs_fd"] in ("skip", "pass"):
            try:
                fd = _finite_difference(fn, fn.primals(), fn.tangents(idx))
                ok = _close(ref_t, fd, rtol=1e-4, atol=1e-5)
                result["torch.func_vs_fd"] = "pass" if ok else f"sample {idx}: differs from FD"
            except Exception as e:
                result["torch.func_vs_fd"] = f"sample {idx}: {_short(e)}"
    return result


@pytest.mark.parametrize("key", FAST_SUBSET)
def test_fast_subset(key):
    result = check_op(OPS_BY_KEY[key], n_samples=2)
    assert result["ft"] == "pass", result


def _rates(results):
    counted = [k for k, r in results.items() if r["ft"] != "skip"]
    passed = [k for k in counted if results[k]["ft"] == "pass"]
    no_fallback = [k for k in counted if not results[k]["fallback"]]
    fd_counted = [k for k, r in results.items() if r["torch.func_vs_fd"] != "skip"]
    fd_passed = [k for k in fd_counted if results[k]["torch.func_vs_fd"] == "pass"]
    return {
        "counted": len(counted),
        "passed": len(passed),
        "without_fallback": len(no_fallback),
        "passed_without_fallback": len([k for k in passed if not results[k]["fallback"]]),
        "fd_counted": len(fd_counted),
        "fd_passed": len(fd_passed),
    }


def _pct(a, b):
    return f"{100 * a / max(b, 1):.1f}%"


def _write_report(results, rates):
    COVERAGE_DIR.mkdir(parents=True, exist_ok=True)
    (COVERAGE_DIR / "jvp_coverage.json").write_text(
        json.dumps({"rates": rates, "ops": results}, indent=1, sort_keys=True)
    )
    r = rates
    lines = [
        "# Forward-mode OpInfo coverage (ft.jvp vs torch.func.jvp)",
        "",
        f"torch {torch.__version__}, float64, CPU, first {N_SAMPLES} samples per OpInfo that "
        f"torch.func.jvp can run. {len(results)} OpInfos support forward AD; an op is counted "
        f"when torch.func handles at least one of its samples. Regenerate with "
        f"`python -m pytest tests/test_opinfo_jvp.py -m slow`.",
        "",
        "| measure | count | of | rate |",
        "|---|---|---|---|",
        f"| ft.jvp matches torch.func.jvp | {r['passed']} | {r['counted']} | "
        f"{_pct(r['passed'], r['counted'])} |",
        f"| served without the general fallback | {r['without_fallback']} | {r['counted']} | "
        f"{_pct(r['without_fallback'], r['counted'])} |",
        f"| passing and without the general fallback | {r['passed_without_fallback']} | "
        f"{r['counted']} | {_pct(r['passed_without_fallback'], r['counted'])} |",
        f"| torch.func.jvp matches central finite differences (eps={FD_EPS}) | {r['fd_passed']} | "
        f"{r['fd_counted']} | {_pct(r['fd_passed'], r['fd_counted'])} |",
        "",
        "## ft failures",
        "",
        "| op | functransforms |",
        "|---|---|",
    ]
    for key, res in sorted(results.items()):
        if res["ft"] not in ("pass", "skip"):
            lines.append(f"| {key} | {res['ft'].replace('|', '/')} |")
    lines += ["", "## Ops served by the general fallback", ""]
    lines.append(", ".join(sorted(k for k, res in results.items() if res["fallback"])) or "none")
    lines += ["", "## torch.func vs finite differences: disagreements", "",
              "| op | torch.func |", "|---|---|"]
    for key, res in sorted(results.items()):
        if res["torch.func_vs_fd"] not in ("pass", "skip"):
            lines.append(f"| {key} | {res['torch.func_vs_fd'].replace('|', '/')} |")
    (COVERAGE_DIR / "jvp_coverage.md").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_full_sweep():
    results = {op_key(op): check_op(op, with_fd=True) for op in JVP_OPS}
    rates = _rates(results)
    _write_report(results, rates)
    assert rates["passed"] >= 0.95 * rates["counted"], rates
    assert rates["without_fallback"] >= 0.80 * rates["counted"], rates
