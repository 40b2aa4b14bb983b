"""OpInfo sweeps of second-order compositions, float64, torch.func as the oracle.

- ``jvpvjp``: forward-over-reverse. ``g(primals, cotangents) = vjp(op, *primals)[1](cotangents)``
  is pushed forward with tangents for primals *and* cotangents.
- ``vjpvjp``: reverse-over-reverse. ``g`` is pulled back with respect to primals and cotangents.
- ``vmapjvp``: vmap of ``jvp(op)`` over a batch of tangents, and of primals and tangents,
  against a per-example loop (tests/opinfo_util.py); records whether ft needed the per-example
  loop (``ft.fallback_counts``) or the general JVP fallback (``ft.jvp_fallback_counts``).

For the two derivative sweeps torch.func is the oracle for ft, and plain autograd (double
backward, and forward AD through the backward graph, as torch.func's own tests do) calibrates
torch.func: a sample torch.func cannot run is not counted. Where ft and torch.func disagree on
jvp(vjp), central differences of the first-order pullback decide: when they side with ft,
torch.func is the one marked failing. For each sweep an op passes when
every counted sample matches. The slow test of a sweep passes when every op torch.func passes
also passes for ft. Every sweep writes benchmarks/coverage/<sweep>_coverage.{md,json}.

Ops run in a worker process (one per sweep, restarted after a crash), so that an op crashing
the interpreter is recorded as a failure instead of ending the sweep. Run one sweep by hand:
``python tests/test_opinfo_higher_order.py jvpvjp`` (writes the report).
"""
import collections
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.func
from torch.testing._internal.common_methods_invocations import op_db
from torch.utils._pytree import tree_flatten, tree_unflatten

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import functransforms as ft  # noqa: E402
from opinfo_util import Transforms, is_random, jvp_cases, run_op  # noqa: E402

N_SAMPLES = 3
BUDGET_S = 20.0  # per op and sweep: slow samples stop the op early, counted ones still count
REPO = pathlib.Path(__file__).resolve().parent.parent
COVERAGE_DIR = REPO / "benchmarks" / "coverage"
RTOL, ATOL = 1e-5, 1e-7


def op_key(op):
    return op.name + ("." + op.variant_test_name if op.variant_test_name else "")


def _f64(op):
    return torch.float64 in op.supported_dtypes("cpu")


SWEEP_OPS = {
    "jvpvjp": [op for op in op_db if op.supports_autograd and op.supports_forward_ad and _f64(op)],
    "vjpvjp": [op for op in op_db if op.supports_autograd and _f64(op)],
    "vmapjvp": [op for op in op_db if op.supports_forward_ad and _f64(op)],
}
TITLES = {
    "jvpvjp": "jvp(vjp(op)): forward-over-reverse, tangents for primals and cotangents",
    "vjpvjp": "vjp(vjp(op)): reverse-over-reverse, w.r.t. primals and cotangents",
    "vmapjvp": "vmap(jvp(op)): batched primals and tangents, against a per-example loop",
}


def _short(err):
    msg = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return re.sub(r"0x[0-9a-f]+", "0x?", msg)[:160]


def _is_diff(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad


class _SampleFn:
    """The op applied to a sample, as a function of the sample's differentiable tensors."""

    def __init__(self, op, sample):
        self.op, self.sample = op, sample
        leaves, self.spec = tree_flatten((sample.input, sample.args, sample.kwargs))
        self.leaves = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]
        self.diff_pos = [i for i, x in enumerate(leaves) if _is_diff(x)]

    def primals(self):
        return tuple(self.leaves[i].clone() for i in self.diff_pos)

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


def _randn_like(ts, gen):
    return tuple(torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in ts)


def _pullback(vjp, fn, n):
    """``g(*primals, *cotangents)``: the vjp of ``fn`` as a function of both."""

    def g(*args):
        _, vjp_fn = vjp(fn, *args[:n])
        return tuple(vjp_fn(tuple(args[n:])))

    return g


class Unusable(Exception):
    """The sample says nothing about ft: torch.func cannot run it, or it has no output."""


def _problem(fn, seed):
    """(primals + cotangents, their tangents, second-order cotangents) for one sample."""
    if not fn.diff_pos:
        raise Unusable("no differentiable input")
    primals = fn.primals()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = fn(*primals)
    if not outs:
        raise Unusable("no floating point output")
    gen = torch.Generator().manual_seed(seed)
    cts = _randn_like(outs, gen)
    args = primals + cts
    return args, _randn_like(args, gen), gen


def _jvpvjp(jvp, vjp, fn, args, tangents):
    return jvp(_pullback(vjp, fn, len(fn.diff_pos)), args, tangents)


def _vjpvjp(vjp, fn, args, gen_seed):
    out, vjp_fn = vjp(_pullback(vjp, fn, len(fn.diff_pos)), *args)
    cts2 = _randn_like(out, torch.Generator().manual_seed(gen_seed))
    return out, vjp_fn(cts2), cts2


def _ref_jvpvjp(fn, args, tangents):
    """Plain autograd: backward with create_graph on dual tensors."""
    n = len(fn.diff_pos)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(a.clone().requires_grad_(i < n), t)
                 for i, (a, t) in enumerate(zip(args, tangents))]
        outs = fn(*duals[:n])
        pairs = [(o, c) for o, c in zip(outs, duals[n:]) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], duals[:n], [c for _, c in pairs],
                                    create_graph=True, allow_unused=True)
        res = [fwAD.unpack_dual(g) if g is not None else None for g in grads]
        primal = tuple(torch.zeros_like(a) if r is None else r.primal.detach()
                       for r, a in zip(res, args))
        tangent = tuple(torch.zeros_like(a) if r is None or r.tangent is None else r.tangent
                        for r, a in zip(res, args))
    return primal, tangent


def _ref_vjpvjp(fn, args, cts2):
    n = len(fn.diff_pos)
    leaves = [a.clone().requires_grad_() for a in args]
    outs = fn(*leaves[:n])
    pairs = [(o, c) for o, c in zip(outs, leaves[n:]) if o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in pairs], leaves[:n], [c for _, c in pairs],
                                create_graph=True, allow_unused=True)
    grad_pairs = [(g, c) for g, c in zip(grads, cts2) if g is not None and g.requires_grad]
    if grad_pairs:
        second = torch.autograd.grad([g for g, _ in grad_pairs], leaves, [c for _, c in grad_pairs],
                                     allow_unused=True)
    else:
        second = [None] * len(leaves)
    first = tuple(torch.zeros_like(a) if g is None else g.detach() for g, a in zip(grads, args))
    return first, tuple(torch.zeros_like(a) if g is None else g for g, a in zip(second, args))


def _close(actual, expected):
    a_flat, e_flat = tree_flatten(actual)[0], tree_flatten(expected)[0]
    return len(a_flat) == len(e_flat) and all(
        type(a) is torch.Tensor
        and a.shape == e.shape
        and torch.allclose(a, e, rtol=RTOL, atol=ATOL, equal_nan=True)
        for a, e in zip(a_flat, e_flat)
    )


def check_derivative_op(op, kind, n_samples=N_SAMPLES, budget_s=BUDGET_S):
    """{'ft': status, 'torch.func': status, 'torch.func_vs_autograd': status}.

    A status is 'pass', 'skip' (no usable sample) or a failure reason. 'torch.func' fails only
    when it disagrees with plain autograd where autograd could run the sample.
    """
    result = {"ft": "skip", "torch.func": "skip", "torch.func_vs_autograd": "skip"}
    counted = 0
    start = time.perf_counter()
    try:
        samples = list(op.sample_inputs("cpu", torch.float64, requires_grad=True))
    except Exception as e:
        return {name: f"sample inputs failed: {_short(e)}" for name in result}
    for idx, sample in enumerate(samples):
        if counted == n_samples or time.perf_counter() - start > budget_s:
            break
        fn = _SampleFn(op, sample)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                args, tangents, _ = _problem(fn, idx)
                if kind == "jvpvjp":
                    ref = _jvpvjp(torch.func.jvp, torch.func.vjp, fn, args, tangents)
                else:
                    out, grads, cts2 = _vjpvjp(torch.func.vjp, fn, args, idx + 1000)
                    ref = (out, tuple(grads))
            except Exception:
                continue
            counted += 1
            if result["torch.func_vs_autograd"] in ("skip", "pass"):
                try:
                    auto = (_ref_jvpvjp(fn, args, tangents) if kind == "jvpvjp"
                            else _ref_vjpvjp(fn, args, cts2))
                except Exception:
                    auto = None
                if auto is not None:
                    ok = _close(ref, auto)
                    result["torch.func_vs_autograd"] = "pass" if ok else f"sample {idx}: differs"
            if result["torch.func"] == "skip":
                result["torch.func"] = "pass"
            if result["ft"] not in ("skip", "pass"):
                continue
            try:
                if kind == "jvpvjp":
                    got = _jvpvjp(ft.jvp, ft.vjp, fn, args, tangents)
                else:
                    out, grads, _ = _vjpvjp(ft.vjp, fn, args, idx + 1000)
                    got = (out, tuple(grads))
            except Exception as e:
                result["ft"] = f"sample {idx}: {_short(e)}"
                continue
            if not _close(got[0], ref[0]):
                result["ft"] = f"sample {idx}: outputs differ"
            elif _close(got[1], ref[1]):
                result["ft"] = "pass"
            elif kind == "jvpvjp" and _fd_sides_with_ft(fn, args, tangents, got[1], ref[1]):
                # torch.func's forward-over-reverse formulas are not all right; the
                # pullback's finite differences settle it.
                result["ft"] = "pass"
                result["torch.func"] = f"sample {idx}: disagrees with finite differences"
            else:
                result["ft"] = f"sample {idx}: " + (
                    "tangents differ" if kind == "jvpvjp" else "gradients differ")
    if result["torch.func_vs_autograd"] not in ("skip", "pass"):
        result["torch.func"] = "disagrees with autograd: " + result["torch.func_vs_autograd"]
    return result


def _fd_sides_with_ft(fn, args, tangents, ft_t, tf_t, eps=1e-6):
    """Central differences of torch.func's first-order pullback along the tangents agree
    with ft's forward-over-reverse and not with torch.func's."""
    g = _pullback(torch.func.vjp, fn, len(fn.diff_pos))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plus = g(*(a + eps * t for a, t in zip(args, tangents)))
            minus = g(*(a - eps * t for a, t in zip(args, tangents)))
    except Exception:
        return False
    fd = tuple((p - m) / (2 * eps) for p, m in zip(plus, minus))

    def near(x):
        return all(torch.allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, b.abs().max().item()))
                   for a, b in zip(x, fd))

    return near(ft_t) and not near(tf_t)


FT = Transforms(ft.vmap, ft.vjp, ft.jvp)
TF = Transforms(torch.func.vmap, torch.func.vjp, torch.func.jvp)


def check_vmapjvp_op(op, n_samples=N_SAMPLES, budget_s=BUDGET_S):
    """{'ft', 'torch.func': status vs the loop, 'loop': ft ran ops per example,
    'loop_ops', 'general_jvp_fallback'}."""
    if is_random(op, n_samples):
        return {"ft": "skip", "torch.func": "skip", "random": True}
    ft.reset_fallback_counts()
    ft.reset_jvp_fallback_counts()
    status, used_loop = run_op(op, lambda op: jvp_cases(op, n_samples),
                               {"torch.func": TF, "ft": FT}, ft.fallback_counts, budget_s)
    return dict(status, loop=used_loop, loop_ops=sorted(ft.fallback_counts()),
                general_jvp_fallback=sorted(ft.jvp_fallback_counts()))


def check_op(op, kind):
    if kind == "vmapjvp":
        return check_vmapjvp_op(op)
    return check_derivative_op(op, kind)


def _worker(kind, start, path):
    """Sweep SWEEP_OPS[kind][start:], one JSON line when an op starts and one when it is done."""
    torch.set_num_threads(1)
    with open(path, "a") as log:
        for op in SWEEP_OPS[kind][start:]:
            log.write(json.dumps({"start": op_key(op)}) + "\n")
            log.flush()
            log.write(json.dumps({"key": op_key(op), "entry": check_op(op, kind)}) + "\n")
            log.flush()


def sweep(kind, progress=None):
    ops = SWEEP_OPS[kind]
    index = {op_key(op): i for i, op in enumerate(ops)}
    results = collections.OrderedDict()
    start = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = progress or os.path.join(tmp, "sweep.jsonl")
        open(path, "w").close()
        while start < len(ops):
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", kind, str(start), path],
                cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                text=True,
            )
            started = None
            with open(path) as log:
                for line in log:
                    record = json.loads(line)
                    if "start" in record:
                        started = record["start"]
                    else:
                        results[record["key"]] = record["entry"]
                        started = None
            if started is None:
                break
            results[started] = {"ft": f"crashed the process (exit code {proc.returncode})",
                                "torch.func": "skip"}
            start = index[started] + 1
    return results


def summarize(results):
    ft_counted = [k for k, r in results.items() if r["ft"] != "skip"]
    ft_pass = {k for k in ft_counted if results[k]["ft"] == "pass"}
    tf_counted = [k for k, r in results.items() if r["torch.func"] != "skip"]
    tf_pass = {k for k in tf_counted if results[k]["torch.func"] == "pass"}
    figures = {
        "ops": len(ft_counted), "ft passed": len(ft_pass),
        "ft failed": len(ft_counted) - len(ft_pass),
        "torch.func ops": len(tf_counted), "torch.func passed": len(tf_pass),
        "torch.func passes, ft fails": sorted(tf_pass - ft_pass),
    }
    if any("loop" in r for r in results.values()):
        figures["ft passed without the loop"] = len(
            [k for k in ft_pass if not results[k].get("loop")])
        figures["ft passed without any fallback"] = len(
            [k for k in ft_pass if not results[k].get("loop")
             and not results[k].get("general_jvp_fallback")])
    return figures


def _pct(a, b):
    return f"{100 * a / max(b, 1):.1f}%"


def write_report(kind, results):
    COVERAGE_DIR.mkdir(parents=True, exist_ok=True)
    f = summarize(results)
    (COVERAGE_DIR / f"{kind}_coverage.json").write_text(
        json.dumps({"figures": f, "ops": results}, indent=1, sort_keys=True))
    ref = "a per-example loop of torch.func.jvp" if kind == "vmapjvp" else "torch.func"
    lines = [
        f"# {TITLES[kind]}",
        "",
        f"torch {torch.__version__}, float64, CPU, first {N_SAMPLES} samples per OpInfo "
        f"(at most {BUDGET_S:.0f} s per op), rtol {RTOL}, atol {ATOL}. Reference: {ref}. "
        f"{len(SWEEP_OPS[kind])} OpInfos; an op is counted when the reference runs on at least "
        f"one of its samples, and passes when every counted sample matches. Regenerate with "
        f"`python -m pytest tests/test_opinfo_higher_order.py -m slow -k {kind}`.",
        "",
        "| measure | count | of | rate |",
        "|---|---|---|---|",
        f"| functransforms passed | {f['ft passed']} | {f['ops']} | "
        f"{_pct(f['ft passed'], f['ops'])} |",
        f"| functransforms failed | {f['ft failed']} | {f['ops']} | "
        f"{_pct(f['ft failed'], f['ops'])} |",
        f"| torch.func passed | {f['torch.func passed']} | {f['torch.func ops']} | "
        f"{_pct(f['torch.func passed'], f['torch.func ops'])} |",
    ]
    if kind == "vmapjvp":
        lines += [
            f"| functransforms passed without the per-example loop | "
            f"{f['ft passed without the loop']} | {f['ops']} | "
            f"{_pct(f['ft passed without the loop'], f['ops'])} |",
            f"| ... and without the general JVP fallback | "
            f"{f['ft passed without any fallback']} | {f['ops']} | "
            f"{_pct(f['ft passed without any fallback'], f['ops'])} |",
        ]
    else:
        lines.append("")
        lines.append("torch.func is checked against plain autograd (double backward, forward AD "
                     "through the backward graph) where autograd runs the sample; it fails an op "
                     "only when they disagree.")
    lines += ["", "## Failures (ft, or torch.func)", "",
              "Ops that torch.func fails too are known failures, not regressions.", "",
              "| op | functransforms | torch.func |", "|---|---|---|"]
    for key, r in sorted(results.items()):
        if r["ft"] not in ("pass", "skip") or r["torch.func"] not in ("pass", "skip"):
            cells = [str(c).replace("|", "\\|") for c in (r["ft"], r["torch.func"])]
            lines.append(f"| {key} | {cells[0]} | {cells[1]} |")
    if kind == "vmapjvp":
        lines += ["", "## Passed only through the per-example loop", "",
                  "| op | ops run per example |", "|---|---|"]
        for key, r in sorted(results.items()):
            if r["ft"] == "pass" and r.get("loop"):
                lines.append(f"| {key} | {', '.join(r['loop_ops'])} |")
    (COVERAGE_DIR / f"{kind}_coverage.md").write_text("\n".join(lines) + "\n")
    return f


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["jvpvjp", "vjpvjp", "vmapjvp"])
def test_full_sweep(kind):
    figures = write_report(kind, sweep(kind))
    assert not figures["torch.func passes, ft fails"], figures


# vmap(jvp) regressions: copies into unbatched buffers (group_norm, stft) and a NaN-safe
# logcumsumexp rule.
VMAPJVP_FAST = ["nn.functional.group_norm", "stft", "logcumsumexp", "cumsum", "sin",
                "nn.functional.layer_norm", "linalg.solve", "softmax"]
_VMAPJVP_BY_KEY = {op_key(op): op for op in SWEEP_OPS["vmapjvp"]}


@pytest.mark.parametrize("key", VMAPJVP_FAST)
def test_vmapjvp_fast_subset(key):
    ft.reset_fallback_counts()
    status, _ = run_op(_VMAPJVP_BY_KEY[key], lambda op: jvp_cases(op, 2), {"ft": FT},
                       ft.fallback_counts)
    assert status["ft"] == "pass", status


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        for kind in sys.argv[1:]:
            res = sweep(kind, progress=os.path.join(tempfile.gettempdir(), f"ho_{kind}.jsonl"))
            print(kind, json.dumps(write_report(kind, res)))
