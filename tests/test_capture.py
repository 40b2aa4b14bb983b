"""capture: a replayed tape gives what eager execution (and torch.func) gives, and calls
the tape cannot stand for run eagerly."""
import copy
import warnings

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F
from expecttest import TestCase as ExpectTest
from torch import nn

import functransforms as ft
from functransforms.core.levels import level_stack


def assert_close_tree(actual, expected):
    a, _ = torch.utils._pytree.tree_flatten(actual)
    e, _ = torch.utils._pytree.tree_flatten(expected)
    assert len(a) == len(e)
    for x, y in zip(a, e):
        assert type(x) is type(y)
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        else:
            assert x == y


def per_sample_grads(api, model):
    def loss(p, x, y):
        return F.nll_loss(api.functional_call(model, p, (x[None],)), y[None])
    return api.vmap(api.grad(loss), in_dims=(None, 0, 0))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_per_sample_grads_replay_matches_torch_func(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 10), nn.LogSoftmax(-1))
        shape = (20,)
    else:
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(4 * 3 * 3, 10), nn.LogSoftmax(-1))
        shape = (1, 8, 8)
    params = {k: v.detach() for k, v in model.named_parameters()}
    captured = ft.capture(per_sample_grads(ft, model))
    expected = per_sample_grads(tf, model)
    for _ in range(3):  # the first call records, the others replay
        x, y = torch.randn(6, *shape), torch.randint(0, 10, (6,))
        assert_close_tree(captured(params, x, y), expected(params, x, y))
    assert level_stack() == []


def test_replay_runs_no_level(monkeypatch):
    from functransforms.batching.interpreter import VmapInterpreter
    from functransforms.reverse.interpreter import GradInterpreter
    f = ft.capture(ft.vmap(ft.grad(lambda x: (x.sin() * x).sum())))
    f(torch.randn(3, 4))
    calls = []
    for cls in (VmapInterpreter, GradInterpreter):
        monkeypatch.setattr(cls, "process", lambda *a, **k: calls.append(a[1]))
    x = torch.randn(3, 4)
    torch.testing.assert_close(f(x), x.cos() * x + x.sin())
    assert calls == []


def test_dropout_in_train_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    params = {k: v.detach() for k, v in model.named_parameters()}
    f = ft.capture(ft.vmap(lambda p, x: ft.functional_call(model, p, (x,)), in_dims=(None, 0),
                           randomness="different"))
    x = torch.ones(64, 4)
    outs = [f(params, x) for _ in range(3)]
    for out in outs:
        zeros = (out == 0).float().mean()
        assert 0.3 < zeros < 0.7
    assert not torch.equal(outs[1], outs[2])


def test_new_signature_records_again():
    f = ft.capture(ft.vmap(ft.grad(lambda x: (x.sin() * x).sum())))
    for batch in (3, 5, 3):
        x = torch.randn(batch, 4)
        assert_close_tree(f(x), tf.vmap(tf.grad(lambda x: (x.sin() * x).sum()))(x))


def test_hessian_and_jacobians():
    def f(x):
        return (x.tanh() ** 2).sum()
    for transform, reference in [(ft.hessian, tf.hessian), (ft.jacrev, tf.jacrev),
                                 (ft.jacfwd, tf.jacfwd)]:
        captured = ft.capture(transform(f))
        for _ in range(2):
            x = torch.randn(5)
            assert_close_tree(captured(x), reference(f)(x))


def test_non_tensor_outputs_and_aux():
    # (torch.func's has_aux only takes Tensors in aux; a non-Tensor output goes through
    # vmap with out_dims=None.)
    f = ft.capture(ft.grad(lambda x: ((x ** 2).sum(), {"x": x}), has_aux=True))
    g = ft.capture(ft.vmap(lambda x: (x ** 2, 3), out_dims=(0, None)))
    for _ in range(2):
        x = torch.randn(3)
        assert_close_tree(f(x), (2 * x, {"x": x}))
        assert_close_tree(g(x), (x ** 2, 3))


def test_inputs_that_require_grad_run_eagerly_and_keep_autograd():
    f = ft.capture(ft.vmap(torch.sin))
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.warns(UserWarning, match="runs eagerly"):
        f(x)
    for _ in range(2):
        y = f(x)
        (g,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(g, x.cos())


def test_eager_fallback_warning_message():
    def f(x):
        return x * x.sum().item()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ft.capture(f)(torch.ones(2))
    self_test = ExpectTest()
    self_test.assertExpectedInline(str(caught[0].message), """capture(f): runs eagerly on calls it cannot replay: aten::_local_scalar_dense has a data-dependent result.""")


def test_data_dependent_python_runs_eagerly():
    def f(x):
        return x.sum() * (2.0 if x.sum().item() > 0 else 3.0)
    captured = ft.capture(ft.grad(f))
    x = torch.ones(3)
    torch.testing.assert_close(captured(x), torch.full((3,), 2.0))
    torch.testing.assert_close(captured(-x), torch.full((3,), 3.0))


def test_random_ops_draw_anew_on_replay():
    f = ft.capture(ft.vmap(lambda x: x + torch.rand(3), randomness="different"))
    x = torch.zeros(4, 3)
    outs = [f(x) for _ in range(3)]
    assert not torch.equal(outs[1], outs[2])
    assert not torch.equal(outs[2][0], outs[2][1])  # still different per example


def test_in_place_parameter_updates_are_seen():
    weight = torch.randn(3)
    f = ft.capture(ft.grad(lambda x: (x * weight).sum()))
    x = torch.randn(3)
    torch.testing.assert_close(f(x), weight)
    with torch.no_grad():
        weight.mul_(2)
    torch.testing.assert_close(f(x), weight)


def test_buffer_updates_are_replayed():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    eager_bn = copy.deepcopy(bn)
    captured = ft.capture(lambda x: ft.functional_call(bn, {}, (x,)).sum())
    for _ in range(3):
        x = torch.randn(8, 3)
        eager = ft.functional_call(eager_bn, {}, (x,)).sum()
        torch.testing.assert_close(captured(x), eager)
    torch.testing.assert_close(bn.running_mean, eager_bn.running_mean)
    torch.testing.assert_close(bn.running_var, eager_bn.running_var)


def test_in_place_writes_into_inputs_are_replayed():
    def f(x):
        x.mul_(2)
        return x + 1
    captured = ft.capture(ft.vmap(f))
    for _ in range(2):
        x = torch.randn(3, 2)
        x_eager = x.clone()
        torch.testing.assert_close(captured(x), f(x_eager))
        torch.testing.assert_close(x, x_eager)


def test_aliased_inputs_are_a_different_signature():
    captured = ft.capture(lambda a, b: a.add_(1) + b)
    a, b = torch.zeros(2), torch.zeros(2)
    torch.testing.assert_close(captured(a, b), torch.ones(2))
    c = torch.zeros(2)
    torch.testing.assert_close(captured(c, c), torch.full((2,), 2.0))


def test_exception_while_recording_leaves_a_usable_process():
    def f(x):
        if x.shape[0] == 2:
            raise ValueError("boom")
        return x.sin()
    captured = ft.capture(ft.vmap(f))
    with pytest.raises(ValueError, match="boom"):
        captured(torch.randn(3, 2))
    assert level_stack() == []
    x = torch.randn(3, 4)
    torch.testing.assert_close(captured(x), x.sin())
    torch.testing.assert_close(captured(x), x.sin())


def test_called_inside_a_transform_runs_eagerly():
    inner = ft.capture(lambda x: x.sin().sum())
    x = torch.randn(4, 3)
    torch.testing.assert_close(ft.vmap(ft.grad(inner))(x), x.cos())


def test_input_also_read_by_closure_stays_a_constant():
    weight = torch.ones(3)
    f = ft.capture(lambda x: x * 2 + weight)
    torch.testing.assert_close(f(weight), torch.full((3,), 3.0))  # recorded with x is weight
    x = torch.zeros(3)
    torch.testing.assert_close(f(x), torch.ones(3))


def test_returned_input_is_the_callers_tensor():
    f = ft.capture(lambda x, y: (x, x + y))
    for _ in range(2):
        x, y = torch.randn(2), torch.randn(2)
        out, total = f(x, y)
        assert out is x
        torch.testing.assert_close(total, x + y)


def test_in_place_shape_change_of_an_input_reaches_the_caller():
    f = ft.capture(lambda x: x.t_().sum(0))
    for _ in range(2):
        x = torch.randn(2, 3)
        expected = x.clone().t().sum(0)
        torch.testing.assert_close(f(x), expected)
        assert x.shape == (3, 2)


def test_returned_closure_tensor_is_not_the_input():
    weight = torch.ones(3)
    f = ft.capture(lambda x: (weight, x + 1))
    f(weight)
    out, plus = f(torch.zeros(3))
    assert out is weight
    torch.testing.assert_close(plus, torch.ones(3))


def test_integer_indexing_and_metadata_queries_are_replayed():
    index = torch.tensor([2, 0])

    def f(x):
        return (x[index] * 2).sum() + torch.result_type(x, 1.0).is_floating_point
    g = ft.capture(ft.vmap(ft.grad(f)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no eager fallback
        for _ in range(2):
            x = torch.randn(4, 3)
            torch.testing.assert_close(g(x), tf.vmap(tf.grad(f))(x))


def test_boolean_mask_indexing_runs_eagerly():
    f = ft.capture(lambda x: x[x > 0].sum())
    with pytest.warns(UserWarning, match="data-dependent"):
        f(torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(f(torch.tensor([-1.0, 2.0])), torch.tensor(2.0))


def test_too_many_signatures_run_eagerly():
    f = ft.capture(ft.vmap(torch.sin))
    with pytest.warns(UserWarning, match="already recorded for 16 input signatures"):
        for batch in range(1, 19):
            x = torch.randn(batch, 2)
            torch.testing.assert_close(f(x), x.sin())


def test_values_nothing_reads_are_not_replayed_but_effects_are():
    weight = torch.randn(3, 3, dtype=torch.float64)

    def f(x, acc):
        acc.add_(1)  # its result is unused, the write is not
        torch.rand(2)  # unused, but eager execution advances the random stream
        (x @ weight).exp()  # unused
        return ft.jacrev(lambda y: (y @ weight).tanh())(x)

    gm = ft.make_graph(f)(torch.randn(3, dtype=torch.float64), torch.zeros(2))
    code = gm.code
    assert "exp" not in code and "add_" in code and "rand" in code
    captured = ft.capture(f)
    acc, acc_eager = torch.zeros(2), torch.zeros(2)
    for seed in range(3):
        x = torch.randn(3, dtype=torch.float64)
        torch.manual_seed(seed)
        out = captured(x, acc)
        after = torch.rand(1)
        torch.manual_seed(seed)
        expected = f(x, acc_eager)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(after, torch.rand(1))
    torch.testing.assert_close(acc, acc_eager)
