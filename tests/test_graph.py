"""make_graph and compiled capture: the recorded program as an FX GraphModule gives what
eager execution (and torch.func) gives, for every transform and compositions, and
``capture(f, backend=...)`` compiles it once per signature."""
import copy
import warnings

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F
from torch import nn

import functransforms as ft
from functransforms.core.levels import level_stack


def assert_close_tree(actual, expected):
    a, sa = torch.utils._pytree.tree_flatten(actual)
    e, se = torch.utils._pytree.tree_flatten(expected)
    assert sa == se, (sa, se)
    for x, y in zip(a, e):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
        else:
            assert x == y


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3), nn.LogSoftmax(-1)).double()


def _f(x):
    return (x.sin() * x.tanh()).sum()


def _g(x):
    return x.sin() * x.roll(1)


def programs(api):
    """name -> (function, input maker(seed)): every transform and usual compositions."""
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def rand(*shape, seed):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64)

    def loss(p, x, y):
        return F.nll_loss(api.functional_call(model, p, (x[None],)), y[None])

    def batch(seed):
        return (params, rand(6, 5, seed=seed),
                torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(seed)))

    stacked = {k: torch.stack([v * (1 + 0.1 * i) for i in range(4)]) for k, v in params.items()}

    def ensemble(p, x):
        return api.vmap(lambda p1: api.functional_call(model, p1, (x,)))(p)

    def in_place(x):
        y = x.clone()
        y.mul_(2)
        return y.sin()

    one = lambda seed: (rand(4, seed=seed),)  # noqa: E731
    two = lambda seed: (rand(4, seed=seed), rand(4, seed=seed + 100))  # noqa: E731
    return {
        "vmap": (api.vmap(lambda x, y: x.sin() * y, in_dims=(0, None)),
                 lambda s: (rand(3, 4, seed=s), rand(4, seed=s + 1))),
        "grad": (api.grad(_f), one),
        "grad_and_value_aux": (api.grad_and_value(lambda x: (_f(x), x.cos()), has_aux=True), one),
        "vjp": (lambda x, v: api.vjp(_g, x)[1](v), two),
        "jvp": (lambda x, t: api.jvp(_g, (x,), (t,)), two),
        "linearize": (lambda x, t: api.linearize(_g, x)[1](t), two),
        "jacrev": (api.jacrev(_g), one),
        "jacfwd": (api.jacfwd(_g), one),
        "hessian": (api.hessian(_f), one),
        "functionalize": (api.functionalize(in_place), one),
        "vmap_grad_per_sample": (api.vmap(api.grad(loss), in_dims=(None, 0, 0)), batch),
        "vmap_functional_call_ensemble": (ensemble, lambda s: (stacked, rand(2, 5, seed=s))),
        "jacfwd_jacrev": (api.jacfwd(api.jacrev(_f)), one),
        "grad_grad": (api.grad(lambda x: api.grad(_f)(x).sum()), one),
        "vmap_jvp": (api.vmap(lambda x, t: api.jvp(_g, (x,), (t,))[1]),
                     lambda s: (rand(3, 4, seed=s), rand(3, 4, seed=s + 1))),
        "vmap_vmap": (api.vmap(api.vmap(torch.outer)),
                      lambda s: (rand(2, 3, 4, seed=s), rand(2, 3, 5, seed=s + 1))),
        "vmap_jacrev": (api.vmap(api.jacrev(_g)), lambda s: (rand(3, 4, seed=s),)),
    }


NAMES = list(programs(ft))


@pytest.mark.parametrize("name", NAMES)
def test_graph_module_matches_eager_and_torch_func(name):
    fn, inputs = programs(ft)[name]
    reference, _ = programs(tf)[name]
    gm = ft.make_graph(fn)(*inputs(0))
    assert isinstance(gm, torch.fx.GraphModule)
    assert "torch.ops.aten." in gm.code
    for seed in (1, 2):  # new values, same signature
        out = gm(*inputs(seed))
        assert_close_tree(out, fn(*inputs(seed)))
        assert_close_tree(out, reference(*inputs(seed)))
    assert level_stack() == []


@pytest.mark.parametrize("name", NAMES)
def test_compiled_capture_matches_torch_func(name):
    fn, inputs = programs(ft)[name]
    reference, _ = programs(tf)[name]
    compiled = ft.capture(fn, backend="eager")
    for seed in (0, 1, 2):  # records, compiles, runs compiled
        assert_close_tree(compiled(*inputs(seed)), reference(*inputs(seed)))


def loss(weights, example, target):
    return ((example.dot(weights) - target) ** 2).mean()


def test_readme_example_prints_readable_aten_code():
    weights, examples, targets = torch.randn(5), torch.randn(64, 5), torch.randn(64)
    psg = ft.vmap(ft.grad(loss), in_dims=(None, 0, 0))
    gm = ft.make_graph(psg)(weights, examples, targets)
    code = gm.code
    assert "def forward(self, weights, example, target):" in code
    assert "mv = torch.ops.aten.mv.default(example_1, weights_1)" in code
    assert "_local_scalar_dense" not in code
    assert "class loss(torch.nn.Module)" in gm.print_readable(print_output=False)
    weights, examples, targets = torch.randn(5), torch.randn(64, 5), torch.randn(64)
    torch.testing.assert_close(
        gm(weights, examples, targets),
        tf.vmap(tf.grad(loss), in_dims=(None, 0, 0))(weights, examples, targets))


def test_placeholders_are_named_after_arguments_and_paths():
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    gm = ft.make_graph(lambda p, x, *, scale: ft.functional_call(model, p, (x,)) * scale)(
        params, torch.randn(2, 5, dtype=torch.float64), scale=2.0)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert names == ["p_0_weight", "p_0_bias", "p_2_weight", "p_2_bias", "x_1", "scale_1"]
    x = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(gm(params, x, scale=2.0), model(x) * 2.0)


def test_non_tensor_results_and_returned_inputs():
    gm = ft.make_graph(lambda x: (x, x + 1, 3, "a"))(torch.zeros(2))
    x = torch.ones(2)
    out = gm(x)
    assert out[0] is x and out[2:] == (3, "a")
    torch.testing.assert_close(out[1], torch.full((2,), 2.0))


def test_closure_tensors_are_attributes_held_by_reference():
    weight = torch.randn(3)
    gm = ft.make_graph(ft.grad(lambda x: (x * weight).sin().sum()))(torch.randn(3))
    assert any(n.op == "get_attr" for n in gm.graph.nodes)
    with torch.no_grad():
        weight.mul_(2)
    x = torch.randn(3)
    torch.testing.assert_close(gm(x), (x * weight).cos() * weight)


@pytest.mark.parametrize("case", ["requires_grad", "data_dependent", "mask", "subclass"])
def test_make_graph_refuses_calls_with_no_fixed_program(case):
    if case == "requires_grad":
        fn, args, reason = torch.sin, (torch.randn(2, requires_grad=True),), "requires grad"
    elif case == "data_dependent":
        fn, args, reason = (lambda x: x * x.sum().item()), (torch.ones(2),), \
            "aten::_local_scalar_dense has a data-dependent result"
    elif case == "mask":
        fn, args, reason = (lambda x: x[x > 0]), (torch.ones(2),), "data-dependent"
    else:
        def fn(x):
            return ft.make_graph(torch.sin)(x)
        fn, args, reason = ft.vmap(fn), (torch.ones(2, 3),), "tensor subclass (BatchedTensor)"
    with pytest.raises(RuntimeError, match="has no graph") as info:
        ft.make_graph(fn)(*args)
    assert reason in str(info.value)
    assert level_stack() == []


def test_compiles_once_per_signature():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    f = ft.capture(ft.vmap(ft.grad(lambda x: (x.sin() * x).sum())), backend=backend)
    for batch in (3, 3, 3, 5, 5, 3, 5):
        x = torch.randn(batch, 4)
        torch.testing.assert_close(f(x), x.cos() * x + x.sin())
    assert len(graphs) == 2


def test_backend_failure_replays_with_a_warning():
    def broken(gm, example_inputs):
        raise NotImplementedError("no kernels here")

    f = ft.capture(ft.vmap(torch.sin), backend=broken)
    x = torch.randn(3, 2)
    f(x)
    with pytest.warns(UserWarning, match="compiling failed .*no kernels here.*replaying"):
        torch.testing.assert_close(f(x), x.sin())
    torch.testing.assert_close(f(x), x.sin())


def test_compiled_calls_that_cannot_be_recorded_run_eagerly():
    f = ft.capture(lambda x: x * x.sum().item(), backend="eager")
    with pytest.warns(UserWarning, match="runs eagerly.*data-dependent"):
        f(torch.ones(2))
    torch.testing.assert_close(f(torch.full((2,), 2.0)), torch.full((2,), 8.0))
    g = ft.capture(ft.vmap(torch.sin), backend="eager")
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.warns(UserWarning, match="requires grad"):
        g(x)
    (grad,) = torch.autograd.grad(g(x).sum(), x)
    torch.testing.assert_close(grad, x.cos())


def test_compiled_writes_into_inputs_and_buffers_and_reads_parameters():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    eager_bn = copy.deepcopy(bn)
    weight = torch.randn(3)

    def f(x, acc):
        acc.add_(1)
        return ft.functional_call(bn, {}, (x * weight,)).sum(), acc * 2

    def reference(x, acc):
        acc.add_(1)
        return ft.functional_call(eager_bn, {}, (x * weight,)).sum(), acc * 2

    compiled = ft.capture(f, backend="aot_eager")
    acc, acc_eager = torch.zeros(2), torch.zeros(2)
    for i in range(4):
        if i == 2:
            with torch.no_grad():
                weight.mul_(2)
        x = torch.randn(8, 3)
        assert_close_tree(compiled(x, acc), reference(x, acc_eager))
    torch.testing.assert_close(acc, acc_eager)
    torch.testing.assert_close(bn.running_mean, eager_bn.running_mean)
    torch.testing.assert_close(bn.running_var, eager_bn.running_var)


def test_compiled_returns_inputs_and_constants_as_themselves():
    weight = torch.ones(3)
    f = ft.capture(lambda x: (x, weight, x + weight), backend="eager")
    for _ in range(3):
        x = torch.randn(3)
        a, b, c = f(x)
        assert a is x and b is weight
        torch.testing.assert_close(c, x + 1)


def test_compile_options_need_a_backend():
    with pytest.raises(ValueError, match="pass a backend"):
        ft.capture(torch.sin, mode="max-autotune")


@pytest.mark.slow
def test_inductor_per_sample_grads_match_torch_func():
    fn, inputs = programs(ft)["vmap_grad_per_sample"]
    reference, _ = programs(tf)["vmap_grad_per_sample"]
    compiled = ft.capture(fn, backend="inductor")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in (0, 1, 2):
            assert_close_tree(compiled(*inputs(seed)), reference(*inputs(seed)))
    # neither an eager run nor a replay instead of the compiled program
    assert not [w for w in caught if "capture(" in str(w.message)], caught


def test_a_constant_whose_layout_changed_is_replayed_not_run_compiled():
    seen = []

    def backend(gm, example_inputs):
        layouts = [(t.shape, t.stride()) for t in example_inputs]

        def run(*args):
            # a compiled program may bake shapes in: it must never see other ones
            assert [(t.shape, t.stride()) for t in args] == layouts
            seen.append(True)
            return gm(*args)
        return run

    weight = torch.ones(3)
    f = ft.capture(ft.vmap(lambda x: x * weight), backend=backend)
    x = torch.randn(2, 3)
    for _ in range(3):
        torch.testing.assert_close(f(x), x)
    assert len(seen) == 2
    weight.data = torch.full((1,), 2.0)  # same signature of the inputs, new shape
    torch.testing.assert_close(f(x), x * 2)
    assert len(seen) == 2

    compiled = []
    g = ft.capture(ft.vmap(lambda x: x * weight), backend=lambda gm, ex: compiled.append(gm))
    g(x)  # records with weight of shape (1,)
    weight.data = torch.full((3,), 3.0)  # changed before the call that would compile
    for _ in range(2):
        torch.testing.assert_close(g(x), x * 3)
    assert compiled == []


def test_unknown_backend_is_refused_when_capturing():
    with pytest.raises(Exception, match="no_such_backend"):
        ft.capture(torch.sin, backend="no_such_backend")
