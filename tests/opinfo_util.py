"""OpInfo vmap sweeps: batch an op's sample inputs and compare vmap against a per-example loop.

A *case* is one sample with some of its tensors batched: three perturbed copies of each
batched tensor are stacked along its in_dim. The reference runs the op once per example and
stacks the results; a vmap implementation passes the case when it returns the same thing.
Cases whose reference cannot run (the perturbed sample is invalid) are skipped, and so are
ops that do not give the same result twice on the same inputs (random ops).
"""
import re
import time
import warnings

import torch
import torch.func
from torch.testing._internal.common_methods_invocations import op_db
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils._python_dispatch import TorchDispatchMode

BATCH = 3
MAX_SINGLE_ARG_CASES = 4


def op_key(op):
    return op.name + ("." + op.variant_test_name if op.variant_test_name else "")


VMAP_OPS = [op for op in op_db if torch.float32 in op.supported_dtypes("cpu")]
OPS_BY_KEY = {op_key(op): op for op in VMAP_OPS}


class Skip(Exception):
    """The case says nothing about vmap (its reference cannot be computed)."""


def short(err):
    msg = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return re.sub(r"0x[0-9a-f]+", "0x?", msg)[:160]


def _perturbed_copies(t, gen):
    if not t.is_floating_point():
        return [t.clone() for _ in range(BATCH)]
    noise = torch.rand(t.shape, generator=gen).to(t.dtype)
    # Multiplicative noise keeps signs and zeros, so domains (log, sqrt, masks) survive.
    return [t * (1 + 0.05 * k * noise) for k in range(BATCH)]


class SampleFn:
    """The op applied to a sample, as a function of a chosen subset of its tensors."""

    def __init__(self, op, sample):
        self.op = op.get_op()
        leaves, self.spec = tree_flatten((sample.input, sample.args, sample.kwargs))
        self.leaves = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]
        self.tensor_pos = [i for i, x in enumerate(self.leaves) if isinstance(x, torch.Tensor)]
        self.float_pos = [i for i in self.tensor_pos if self.leaves[i].is_floating_point()]

    def bind(self, positions):
        def fn(*tensors):
            leaves = list(self.leaves)
            for i, t in zip(positions, tensors):
                leaves[i] = t
            inp, args, kwargs = tree_unflatten(leaves, self.spec)
            return self.op(inp, *args, **kwargs)

        return fn


def _stack_outputs(outs):
    flat = [tree_flatten(o) for o in outs]
    spec = flat[0][1]
    columns = []
    for col in zip(*[f[0] for f in flat]):
        if isinstance(col[0], torch.Tensor):
            columns.append(torch.stack(col))
        elif all(c == col[0] for c in col):
            columns.append(col[0])
        else:
            raise Skip("per-example Python outputs differ")
    return tree_unflatten(columns, spec)


def _close(actual, expected, rtol=1e-3, atol=1e-4):
    a_flat, a_spec = tree_flatten(actual)
    e_flat, e_spec = tree_flatten(expected)
    if a_spec != e_spec:
        return f"output structure {a_spec} != {e_spec}"
    for a, e in zip(a_flat, e_flat):
        if isinstance(e, torch.Tensor):
            if not isinstance(a, torch.Tensor) or type(a) is not torch.Tensor:
                return f"got {type(a).__name__}, expected a plain Tensor"
            if a.shape != e.shape:
                return f"shape {tuple(a.shape)} != {tuple(e.shape)}"
            if a.dtype != e.dtype:
                return f"dtype {a.dtype} != {e.dtype}"
            if e.layout != torch.strided:
                a, e = a.to_dense(), e.to_dense()
            if not torch.allclose(a, e, rtol=rtol, atol=atol, equal_nan=True):
                return "values differ"
        elif a != e:
            return f"{a!r} != {e!r}"
    return None


class Transforms:
    """A vmap and the derivative transforms it maps over: functransforms' or torch.func's."""

    def __init__(self, vmap, vjp, jvp=None):
        self.vmap, self.vjp, self.jvp = vmap, vjp, jvp


class Case:
    """One batched call: ``build(transforms.<uses>)`` mapped over ``batched`` (stacked along
    ``in_dims``)."""

    def __init__(self, label, build, batched, in_dims, reference, uses="vjp", tol=(1e-3, 1e-4)):
        self.label, self.build, self.batched, self.in_dims, self.reference = (
            label, build, batched, in_dims, reference)
        self.uses, self.tol = uses, tol

    def run(self, transforms):
        """None when ``transforms`` match the reference, else 'error: ...' or 'mismatch: ...'."""
        try:
            fn = self.build(getattr(transforms, self.uses))
            out = transforms.vmap(fn, in_dims=self.in_dims)(*self.batched)
        except Exception as e:
            return f"error: {short(e)}"
        reason = _close(out, self.reference, *self.tol)
        return None if reason is None else f"mismatch: {reason}"


def _make_case(label, build, examples, in_dim, uses="vjp", tol=(1e-3, 1e-4)):
    """``examples``: per batched argument, the list of its BATCH per-example values. The
    reference loops over examples with the function built around torch.func's ``uses``
    transform (vjp or jvp)."""
    fn = build(getattr(torch.func, uses))
    # Stacked before the reference runs: in-place ops would change the copies.
    batched = [torch.stack(ex, dim=in_dim) for ex in examples]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs = [fn(*[ex[k] for ex in examples]) for k in range(BATCH)]
            reference = _stack_outputs(outs)
    except Exception as e:
        raise Skip(short(e)) from e
    return Case(label, build, batched, (in_dim,) * len(batched), reference, uses, tol)


def vmap_cases(op, n_samples=3):
    """Cases of plain vmap over each tensor argument in turn, all at once, and at in_dim -1."""
    gen = torch.Generator().manual_seed(0)
    samples = op.sample_inputs("cpu", torch.float32, requires_grad=False)
    for s_idx, sample in enumerate(samples):
        if s_idx == n_samples:
            break
        sfn = SampleFn(op, sample)
        if not sfn.tensor_pos:
            continue
        copies = {i: _perturbed_copies(sfn.leaves[i], gen) for i in sfn.tensor_pos}
        choices = [(f"s{s_idx} arg{i}", [i], 0) for i in sfn.tensor_pos[:MAX_SINGLE_ARG_CASES]]
        if len(sfn.tensor_pos) > 1:
            choices.append((f"s{s_idx} all", sfn.tensor_pos, 0))
        with_dims = [i for i in sfn.tensor_pos if sfn.leaves[i].dim() > 0]
        if with_dims:
            choices.append((f"s{s_idx} arg{with_dims[0]} in_dim=-1", with_dims[:1], -1))
        for label, positions, in_dim in choices:
            try:
                yield _make_case(label, lambda vjp, fn=sfn.bind(positions): fn,
                                 [copies[i] for i in positions], in_dim)
            except Skip:
                continue


def _float_outputs(out):
    return tuple(
        o for o in tree_flatten(out)[0]
        if isinstance(o, torch.Tensor) and o.is_floating_point()
    )


def vjp_cases(op, n_samples=3):
    """Cases of vmap over the vjp of the op w.r.t. its float tensors.

    Two cases per sample: only the cotangents batched (the jacrev pattern), and primals and
    cotangents batched together.
    """
    gen = torch.Generator().manual_seed(0)
    samples = op.sample_inputs("cpu", torch.float32, requires_grad=False)
    for s_idx, sample in enumerate(samples):
        if s_idx == n_samples:
            break
        sfn = SampleFn(op, sample)
        if not sfn.float_pos:
            continue
        fn = sfn.bind(sfn.float_pos)

        def primal_fn(*xs, fn=fn):
            return _float_outputs(fn(*xs))

        primals = [sfn.leaves[i] for i in sfn.float_pos]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outs = primal_fn(*primals)
        except Exception:
            continue
        if not outs:
            continue
        n_primals = len(primals)

        def build(vjp, arrange, primal_fn=primal_fn, n_primals=n_primals):
            def pullback(*batched):
                xs = arrange(*batched)
                _, vjp_fn = vjp(primal_fn, *xs[:n_primals])
                return vjp_fn(tuple(xs[n_primals:]))
            return pullback

        cts = [[torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs] for _ in range(BATCH)]
        ct_columns = [list(col) for col in zip(*cts)]
        p_copies = [_perturbed_copies(p, gen) for p in primals]
        variants = [
            (f"s{s_idx} vjp cotangents", ct_columns, lambda *c, p=tuple(primals): p + c),
            (f"s{s_idx} vjp all", p_copies + ct_columns, lambda *a: a),
        ]
        for label, examples, arrange in variants:
            try:
                yield _make_case(
                    label, lambda vjp, a=arrange, b=build: b(vjp, a), examples, 0)
            except Skip:
                continue


def jvp_cases(op, n_samples=3, dtype=torch.float64):
    """Cases of vmap over the jvp of the op w.r.t. its differentiable float tensors.

    Two cases per sample: only the tangents batched (the jacfwd pattern), and primals and
    tangents batched together. Compared in float64 with derivative tolerances.
    """
    gen = torch.Generator().manual_seed(0)
    samples = op.sample_inputs("cpu", dtype, requires_grad=True)
    for s_idx, sample in enumerate(samples):
        if s_idx == n_samples:
            break
        sfn = SampleFn(op, sample)
        leaves = tree_flatten((sample.input, sample.args, sample.kwargs))[0]
        diff_pos = [i for i in sfn.float_pos if leaves[i].requires_grad]
        if not diff_pos:
            continue
        fn = sfn.bind(diff_pos)

        def primal_fn(*xs, fn=fn):
            torch.manual_seed(0)  # random ops draw the same numbers on every path
            return _float_outputs(fn(*xs))

        primals = [sfn.leaves[i] for i in diff_pos]
        n = len(primals)

        def build(jvp, arrange, primal_fn=primal_fn, n=n):
            def pushforward(*batched):
                xs = arrange(*batched)
                return jvp(primal_fn, tuple(xs[:n]), tuple(xs[n:]))
            return pushforward

        tangents = [[torch.randn(p.shape, generator=gen).to(p.dtype) for p in primals]
                    for _ in range(BATCH)]
        t_columns = [list(col) for col in zip(*tangents)]
        p_copies = [_perturbed_copies(p, gen) for p in primals]
        variants = [
            (f"s{s_idx} jvp tangents", t_columns, lambda *t, p=tuple(primals): p + t),
            (f"s{s_idx} jvp all", p_copies + t_columns, lambda *a: a),
        ]
        for label, examples, arrange in variants:
            try:
                yield _make_case(label, lambda jvp, a=arrange, b=build: b(jvp, a), examples, 0,
                                 uses="jvp", tol=(1e-5, 1e-7))
            except Skip:
                continue


def run_op(op, make_cases, transforms, fallback_counts=None, budget_s=6.0):
    """Run the cases of ``op`` under each of ``transforms`` ({name: Transforms}).

    Returns ({name: 'pass' | 'skip' | '<case>: error|mismatch: ...'}, whether 'ft' ran the
    loop fallback). The fallback is read from ``fallback_counts``.
    """
    result = {name: "skip" for name in transforms}
    used_fallback = False
    start = time.perf_counter()
    try:
        cases = list(make_cases(op))
    except Exception as e:
        return {name: f"error: sample inputs failed: {short(e)}" for name in transforms}, False
    for case in cases:
        for name, tr in transforms.items():
            if result[name] not in ("skip", "pass"):
                continue
            before = fallback_counts() if (fallback_counts and name == "ft") else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reason = case.run(tr)
            if before is not None and fallback_counts() != before:
                used_fallback = True
            result[name] = "pass" if reason is None else f"{case.label}: {reason}"
        if time.perf_counter() - start > budget_s:
            break
    return result, used_fallback


def _clone(x):
    return x.clone() if isinstance(x, torch.Tensor) else x


class _SeededOpSpy(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.seen = True
        return func(*args, **(kwargs or {}))


def is_random(op, n_samples=3):
    """True for ops that draw random numbers (OpInfos often reseed inside the op, so two
    calls can agree) or that return different values on the same inputs."""
    samples = op.sample_inputs("cpu", torch.float32, requires_grad=False)
    for s_idx, sample in enumerate(samples):
        if s_idx == n_samples:
            break
        fn = SampleFn(op, sample).bind([])
        spy = _SeededOpSpy()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with spy:
                    a = tree_map(_clone, fn())
                b = fn()
        except Exception:
            continue
        if spy.seen or _close(a, b) is not None:
            return True
    return False
