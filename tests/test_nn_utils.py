"""functional_call, ensembling and make_functional against torch.func / functorch."""
import copy
import warnings

import expecttest
import functorch
import pytest
import torch
import torch.func as tf
from torch import nn
from torch.utils._pytree import tree_flatten, tree_structure

import functransforms as ft

warnings.filterwarnings("ignore", message=".*per-example loop.*")


def assert_same(actual, expected, atol=1e-5, rtol=1e-4):
    assert tree_structure(actual) == tree_structure(expected), (actual, expected)
    for a, e in zip(tree_flatten(actual)[0], tree_flatten(expected)[0]):
        assert type(a) in (torch.Tensor, nn.Parameter), type(a)
        assert a.shape == e.shape, (a.shape, e.shape)
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


class Failing(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        self.lin(x)
        raise ValueError("boom")


# ---------------------------------------------------------------------------------------
# functional_call


def test_functional_call_matches_torch_func():
    model = mlp()
    x = torch.randn(5, 3)
    params = {k: torch.randn_like(v) for k, v in model.named_parameters()}
    assert_same(ft.functional_call(model, params, (x,)), tf.functional_call(model, params, (x,)))
    # A single non-tuple arg, kwargs, and a tuple of dicts.
    assert_same(ft.functional_call(model, params, x), tf.functional_call(model, params, x))
    split = ({k: v for k, v in params.items() if "0." in k},
             {k: v for k, v in params.items() if "0." not in k})
    assert_same(ft.functional_call(model, split, (x,)), tf.functional_call(model, params, (x,)))


def test_functional_call_partial_dict_keeps_other_tensors():
    model = mlp()
    x = torch.randn(5, 3)
    params = {"2.bias": torch.randn(2)}
    assert_same(ft.functional_call(model, params, (x,)), tf.functional_call(model, params, (x,)))


def test_functional_call_restores_parameters():
    model = mlp()
    before = dict(model.named_parameters())
    ft.functional_call(model, {k: torch.zeros_like(v) for k, v in before.items()}, torch.randn(3))
    after = dict(model.named_parameters())
    assert all(after[k] is before[k] for k in before)


def test_functional_call_restores_parameters_when_forward_raises():
    model = Failing()
    weight, bias = model.lin.weight, model.lin.bias
    with pytest.raises(ValueError, match="boom"):
        ft.functional_call(model, {"lin.weight": torch.zeros(3, 3)}, (torch.randn(3),))
    assert model.lin.weight is weight and model.lin.bias is bias
    assert isinstance(model.lin.weight, nn.Parameter)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_functional_call_tied_weights(tie_weights):
    model = Tied()
    x = torch.randn(2, 3)
    params = {"a.weight": torch.randn(3, 3)}
    assert_same(
        ft.functional_call(model, params, (x,), tie_weights=tie_weights),
        tf.functional_call(model, params, (x,), tie_weights=tie_weights),
    )


def test_functional_call_under_grad_and_vmap():
    model = mlp()
    x = torch.randn(5, 3)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(fc, p, x):
        return fc(model, p, (x,)).pow(2).sum()

    assert_same(
        ft.grad(lambda p, x: loss(ft.functional_call, p, x))(params, x),
        tf.grad(lambda p, x: loss(tf.functional_call, p, x))(params, x),
    )
    assert_same(
        ft.vmap(ft.grad(lambda p, x: loss(ft.functional_call, p, x)), (None, 0))(params, x),
        tf.vmap(tf.grad(lambda p, x: loss(tf.functional_call, p, x)), (None, 0))(params, x),
    )


# ---------------------------------------------------------------------------------------
# Ensembling


def _ensemble(n=10):
    return [mlp(seed) for seed in range(n)]


def test_stack_module_state_matches_torch_func():
    models = _ensemble(3)
    models[0].register_buffer("scale", torch.ones(2))
    for m in models[1:]:
        m.register_buffer("scale", torch.full((2,), 2.0))
    params, buffers = ft.stack_module_state(models)
    expected_params, expected_buffers = tf.stack_module_state(models)
    assert_same((params, buffers), (expected_params, expected_buffers))
    for k, p in params.items():
        assert p.is_leaf and p.requires_grad == expected_params[k].requires_grad
    assert not buffers["scale"].requires_grad


@pytest.mark.parametrize("data_in_dim", [None, 0])
def test_ensemble_of_mlps(data_in_dim):
    models = _ensemble(10)
    params, buffers = ft.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(4, 3) if data_in_dim is None else torch.randn(10, 4, 3)

    def call(fc):
        return lambda p, b, x: fc(base, (p, b), (x,))

    out = ft.vmap(call(ft.functional_call), in_dims=(0, 0, data_in_dim))(params, buffers, x)
    expected = tf.vmap(call(tf.functional_call), in_dims=(0, 0, data_in_dim))(params, buffers, x)
    assert_same(out, expected)
    loop = [m(x if data_in_dim is None else x[i]) for i, m in enumerate(models)]
    assert_same(out, torch.stack(loop).detach())


def test_combine_state_for_ensemble_matches_functorch():
    models = _ensemble(4)
    x = torch.randn(4, 5, 3)
    fmodel, params, buffers = ft.combine_state_for_ensemble(models)
    f_fmodel, f_params, f_buffers = functorch.combine_state_for_ensemble(models)
    assert_same((params, buffers), (f_params, f_buffers))
    assert [p.requires_grad for p in params] == [p.requires_grad for p in f_params]
    assert_same(ft.vmap(fmodel)(params, buffers, x), tf.vmap(f_fmodel)(f_params, f_buffers, x))
    assert_same(
        ft.vmap(fmodel, in_dims=(0, 0, None))(params, buffers, x[0]),
        tf.vmap(f_fmodel, in_dims=(0, 0, None))(f_params, f_buffers, x[0]),
    )


# ---------------------------------------------------------------------------------------
# Per-sample gradients of a model with buffers


def test_per_sample_grads_with_batchnorm_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).eval()
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    x, t = torch.randn(6, 3), torch.randn(6, 2)

    def per_sample(grad, vmap, fc):
        def loss(p, b, x, t):
            out = fc(model, (p, b), (x.unsqueeze(0),))
            return ((out - t.unsqueeze(0)) ** 2).mean()

        return vmap(grad(loss), in_dims=(None, None, 0, 0))(params, buffers, x, t)

    assert_same(
        per_sample(ft.grad, ft.vmap, ft.functional_call),
        per_sample(tf.grad, tf.vmap, tf.functional_call),
    )


# ---------------------------------------------------------------------------------------
# BatchNorm in training mode under vmap


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_batchnorm_training_under_vmap_names_the_fix():
    model = _bn_model()
    x = torch.randn(3, 5, 3)
    with pytest.raises(RuntimeError, match="replace_all_batch_norm_modules_"):
        ft.vmap(model)(x)


def test_replace_all_batch_norm_modules_makes_vmap_legal():
    model = ft.replace_all_batch_norm_modules_(_bn_model())
    bn = model[1]
    assert bn.running_mean is None and bn.running_var is None and not bn.track_running_stats
    x = torch.randn(3, 5, 3)
    assert_same(ft.vmap(model)(x), tf.vmap(model)(x))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(fc):
        return lambda p, x: fc(model, p, (x,)).pow(2).sum()

    assert_same(
        ft.vmap(ft.grad(loss(ft.functional_call)), (None, 0))(params, x),
        tf.vmap(tf.grad(loss(tf.functional_call)), (None, 0))(params, x),
    )


def test_replace_all_batch_norm_modules_matches_torch_func():
    ours = ft.replace_all_batch_norm_modules_(_bn_model())
    theirs = tf.replace_all_batch_norm_modules_(_bn_model())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert ours[1].track_running_stats == theirs[1].track_running_stats


# ---------------------------------------------------------------------------------------
# make_functional (functorch-era tour)


def test_tour_make_functional():
    # The functorch tour's recipe: a functional model and per-example gradients of it.
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    data = torch.randn(4, 3)
    targets = torch.randn(4, 3)

    func_model, params = ft.make_functional(model)
    f_func_model, f_params = functorch.make_functional(model)

    def compute_loss(fmodel):
        def loss(params, data, targets):
            preds = fmodel(params, data.unsqueeze(0))
            return torch.nn.functional.mse_loss(preds, targets.unsqueeze(0))

        return loss

    ours = ft.vmap(ft.grad(compute_loss(func_model)), in_dims=(None, 0, 0))(params, data, targets)
    theirs = tf.vmap(tf.grad(compute_loss(f_func_model)), in_dims=(None, 0, 0))(
        f_params, data, targets
    )
    assert_same(ours, theirs)


def test_tour_make_functional_with_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    x = torch.randn(5, 3)
    func_model, params, buffers = ft.make_functional_with_buffers(model)
    f_func_model, f_params, f_buffers = functorch.make_functional_with_buffers(model)
    assert_same((params, buffers), (f_params, f_buffers))
    assert_same(func_model(params, buffers, x), f_func_model(f_params, f_buffers, x))
    grads = ft.grad(lambda p: func_model(p, buffers, x).sum())(params)
    expected = tf.grad(lambda p: f_func_model(p, f_buffers, x).sum())(f_params)
    assert_same(grads, expected)


@pytest.mark.parametrize("disable", [False, True])
def test_make_functional_params_are_copies(disable):
    model = mlp()
    fmodel, params = ft.make_functional(model, disable_autograd_tracking=disable)
    _, f_params = functorch.make_functional(model, disable_autograd_tracking=disable)
    assert [p.requires_grad for p in params] == [p.requires_grad for p in f_params]
    assert not any(p is q for p, q in zip(params, model.parameters()))
    assert all(p.device.type == "meta" for p in fmodel.parameters())
    assert_same(tuple(p.detach() for p in params), tuple(p.detach() for p in f_params))


def test_make_functional_tied_weights():
    model = Tied()
    x = torch.randn(2, 3)
    fmodel, params = ft.make_functional(model)
    f_fmodel, f_params = functorch.make_functional(model)
    assert len(params) == len(f_params) == 3
    new = tuple(torch.randn_like(p) for p in params)
    assert_same(fmodel(new, x), f_fmodel(new, x))


class TestErrors(expecttest.TestCase):
    def test_strict(self):
        model = mlp()
        with self.assertRaises(RuntimeError) as ctx:
            ft.functional_call(model, {"0.weight": torch.randn(8, 3), "9.bias": torch.randn(2)},
                               (torch.randn(3),), strict=True)
        self.assertExpectedInline(
            str(ctx.exception),
            """\
Error(s) in reparametrizing for Sequential:
	Unexpected key(s): '9.bias'.
	Missing key(s): '0.bias', '2.bias', '2.weight'.""",
        )

    def test_repeated_keys(self):
        model = mlp()
        w = torch.randn(8, 3)
        with self.assertRaises(ValueError) as ctx:
            ft.functional_call(model, ({"0.weight": w}, {"0.weight": w}), (torch.randn(3),))
        self.assertExpectedInline(
            str(ctx.exception),
            """functional_call: ['0.weight'] appear in more than one of the dicts; which value to use is ambiguous. Give each name exactly once.""",  # noqa: B950
        )

    def test_stack_module_state_mixed(self):
        with self.assertRaises(RuntimeError) as ctx:
            ft.stack_module_state([mlp(), nn.Linear(3, 2)])
        self.assertExpectedInline(
            str(ctx.exception),
            """stack_module_state: Expected all models to be of the same class.""",
        )
        with self.assertRaises(RuntimeError) as ctx:
            ft.stack_module_state([mlp(), mlp().eval()])
        self.assertExpectedInline(
            str(ctx.exception),
            """stack_module_state: Expected all models to have the same training/eval mode (all training or all eval).""",  # noqa: B950
        )
        with self.assertRaises(RuntimeError) as ctx:
            ft.combine_state_for_ensemble([])
        self.assertExpectedInline(
            str(ctx.exception),
            """combine_state_for_ensemble: Expected at least one model, got 0.""",
        )

    def test_make_functional_with_buffers_needed(self):
        with self.assertRaises(RuntimeError) as ctx:
            ft.make_functional(nn.BatchNorm1d(3))
        self.assertExpectedInline(
            str(ctx.exception),
            """make_functional(model): the model has buffers. Use make_functional_with_buffers(model) instead.""",  # noqa: B950
        )

    def test_fmodel_wrong_number_of_params(self):
        fmodel, params = ft.make_functional(mlp())
        with self.assertRaises(RuntimeError) as ctx:
            fmodel(params[:2], torch.randn(3))
        self.assertExpectedInline(
            str(ctx.exception),
            """fmodel: expected 4 tensors in params (one per distinct tensor of the model, in the order make_functional returned them), got 2.""",  # noqa: B950
        )
