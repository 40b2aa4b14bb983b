"""OpInfo sweep of reverse mode: ft.vjp against torch.autograd.grad, with torch.func.vjp as a peer.

For every OpInfo that supports autograd (float64, CPU) and each of its first few sample inputs,
the op is run as a function of its differentiable float tensors (those the sample marks with
``requires_grad``); a random cotangent is pulled back through it three ways. Plain autograd is
the reference: a sample it cannot differentiate is skipped, not counted. An op passes when every
counted sample matches.

The default tier checks a fixed subset; ``-m slow`` runs everything and writes
benchmarks/coverage/grad_coverage.{md,json}.
"""
import collections
import json
import pathlib
import re

import pytest
import torch
import torch.func
from torch.testing._internal.common_methods_invocations import op_db
from torch.utils._pytree import tree_flatten, tree_unflatten

import functransforms as ft

N_SAMPLES = 3
COVERAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "coverage"

GRAD_OPS = [op for op in op_db if op.supports_autograd and torch.float64 in op.supported_dtypes("cpu")]


def op_key(op):
    return op.name + ("." + op.variant_test_name if op.variant_test_name else "")


OPS_BY_KEY = {op_key(op): op for op in GRAD_OPS}

# Ops whose samples reach the dispatcher through many different aten families: views, reductions,
# linear algebra, ops saving outputs, multi-output ops, tensor lists, indexing and nn kernels.
FAST_SUBSET = [
    "sin", "exp", "tanh", "sigmoid", "sqrt", "pow", "div.no_rounding_mode", "atan2",
    "sum", "mean", "prod", "amax", "max.reduction_with_dim", "cumsum", "norm",
    "matmul", "mm", "bmm", "addmm", "linalg.solve", "linalg.det",
    "softmax", "log_softmax", "nn.functional.layer_norm", "nn.functional.conv2d",
    "cat", "stack", "index_select", "gather", "transpose", "expand", "where", "clamp",
    # Regressions: running stats written in place, conjugate-bit views.
    "nn.functional.batch_norm", "linalg.eig", "fft.hfftn",
]


class RefUndefined(Exception):
    """Plain autograd cannot differentiate this sample: it says nothing about the transforms."""


def _is_diff(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad


def _float_outputs(out):
    return [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.is_floating_point()]


class _SampleFn:
    """The op applied to a sample, as a function of the sample's differentiable tensors."""

    def __init__(self, op, sample):
        self.op = op
        self.sample = sample
        leaves, self.spec = tree_flatten((sample.input, sample.args, sample.kwargs))
        self.leaves = [leaf.detach() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        self.diff_pos = [i for i, leaf in enumerate(leaves) if _is_diff(leaf)]

    def primals(self):
        return [self.leaves[i].clone() for i in self.diff_pos]

    def __call__(self, *diff):
        leaves = list(self.leaves)
        for i, t in zip(self.diff_pos, diff):
            leaves[i] = t
        inp, args, kwargs = tree_unflatten(leaves, self.spec)
        torch.manual_seed(0)  # random ops must draw the same numbers on every path
        out = self.op.gradcheck_wrapper(self.op.get_op(), inp, *args, **kwargs)
        return tuple(_float_outputs(self.sample.output_process_fn_grad(out)))


def _reference(fn, cotangents_seed):
    primals = [p.requires_grad_() for p in fn.primals()]
    outs = fn(*primals)
    pairs = [(o, c) for o, c in zip(outs, _cotangents(outs, cotangents_seed)) if o.requires_grad]
    if not primals or not pairs:
        raise RefUndefined("no differentiable input or output")
    try:
        grads = torch.autograd.grad(
            [o for o, _ in pairs], primals, [c for _, c in pairs], allow_unused=True
        )
    except RuntimeError as e:
        raise RefUndefined(str(e)) from e
    return [o.detach() for o in outs], [torch.zeros_like(p) if g is None else g for g, p in zip(grads, primals)]


def _cotangents(outs, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in outs]


def _transform_vjp(vjp, fn, seed):
    out, vjp_fn = vjp(fn, *fn.primals())
    return list(out), list(vjp_fn(tuple(_cotangents(out, seed))))


def _dense(t):
    return t if t.layout == torch.strided else t.to_dense()


def _close(actual, expected):
    return len(actual) == len(expected) and all(
        type(a) is torch.Tensor
        and a.shape == e.shape
        and a.layout == e.layout
        and torch.allclose(_dense(a), _dense(e), rtol=1e-5, atol=1e-7, equal_nan=True)
        for a, e in zip(actual, expected)
    )


def _short(err):
    msg = f"{type(err).__name__}: {err}".splitlines()[0]
    return re.sub(r"0x[0-9a-f]+", "0x?", msg)[:160]


def check_op(op, n_samples=N_SAMPLES):
    """{'ft': status, 'torch.func': status} with status 'pass', 'skip' or a failure reason."""
    result = {"ft": "skip", "torch.func": "skip"}
    samples = op.sample_inputs("cpu", torch.float64, requires_grad=True)
    counted = 0
    for idx, sample in enumerate(samples):
        if counted == n_samples:
            break
        fn = _SampleFn(op, sample)
        try:
            ref_out, ref_grads = _reference(fn, idx)
        except RefUndefined:
            continue
        except Exception:  # the sample itself is unusable (e.g. op rejects it): not ours to count
            continue
        counted += 1
        for name, vjp in (("ft", ft.vjp), ("torch.func", torch.func.vjp)):
            if result[name] not in ("skip", "pass"):
                continue
            try:
                out, grads = _transform_vjp(vjp, fn, idx)
            except Exception as e:
                result[name] = f"sample {idx}: {_short(e)}"
                continue
            if not _close(out, ref_out):
                result[name] = f"sample {idx}: outputs differ"
            elif not _close(grads, ref_grads):
                result[name] = f"sample {idx}: gradients differ"
            else:
                result[name] = "pass"
    return result


@pytest.mark.parametrize("key", FAST_SUBSET)
def test_fast_subset(key):
    result = check_op(OPS_BY_KEY[key])
    assert result["ft"] == "pass", result


def _rate(results, name):
    counted = [k for k, r in results.items() if r[name] != "skip"]
    passed = [k for k in counted if results[k][name] == "pass"]
    return len(passed), len(counted)


def _write_report(results):
    COVERAGE_DIR.mkdir(parents=True, exist_ok=True)
    (COVERAGE_DIR / "grad_coverage.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    ft_pass, ft_total = _rate(results, "ft")
    tf_pass, tf_total = _rate(results, "torch.func")
    lines = [
        "# Reverse-mode OpInfo coverage (ft.vjp vs torch.autograd.grad)",
        "",
        f"torch {torch.__version__}, float64, CPU, first {N_SAMPLES} differentiable samples per OpInfo. "
        f"{len(results)} OpInfos support autograd; an op is counted when plain autograd can "
        f"differentiate at least one of its samples. Regenerate with "
        f"`python -m pytest tests/test_opinfo_grad.py -m slow`.",
        "",
        "| transform | pass | counted | rate |",
        "|---|---|---|---|",
        f"| functransforms.vjp | {ft_pass} | {ft_total} | {100 * ft_pass / max(ft_total, 1):.1f}% |",
        f"| torch.func.vjp | {tf_pass} | {tf_total} | {100 * tf_pass / max(tf_total, 1):.1f}% |",
        "",
        "## Failures",
        "",
        "| op | functransforms | torch.func |",
        "|---|---|---|",
    ]
    for key, r in sorted(results.items()):
        if r["ft"] not in ("pass", "skip") or r["torch.func"] not in ("pass", "skip"):
            cells = [c.replace("|", "\\|") for c in (r["ft"], r["torch.func"])]
            lines.append(f"| {key} | {cells[0]} | {cells[1]} |")
    (COVERAGE_DIR / "grad_coverage.md").write_text("\n".join(lines) + "\n")
    return ft_pass / max(ft_total, 1), tf_pass / max(tf_total, 1)


@pytest.mark.slow
def test_full_sweep():
    results = collections.OrderedDict()
    for op in GRAD_OPS:
        results[op_key(op)] = check_op(op)
    ft_rate, tf_rate = _write_report(results)
    assert ft_rate >= tf_rate
    assert ft_rate >= 0.95
