"""Acceptance: the whirlwind tour's vmap examples and per-sample gradients of an MLP and a
small CNN, matching torch.func and served without the per-example loop fallback."""
import pytest
import torch
import torch.func as tf
import torch.nn.functional as F

import functransforms as ft


@pytest.fixture(autouse=True)
def no_fallback():
    ft.reset_fallback_counts()
    yield
    assert ft.fallback_counts() == {}


def assert_close_dict(actual, expected, atol=1e-6):
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], atol=atol, rtol=1e-5, msg=k)


# -- whirlwind tour (only the import changed) ---------------------------------------------


def test_tour_vmap_model():
    torch.manual_seed(0)
    batch_size, feature_size = 3, 5
    weights = torch.randn(feature_size, requires_grad=True)

    def model(feature_vec):
        # Very simple linear model with activation
        assert feature_vec.dim() == 1
        return feature_vec.dot(weights).relu()

    examples = torch.randn(batch_size, feature_size)
    result = ft.vmap(model)(examples)
    torch.testing.assert_close(result, tf.vmap(model)(examples))


# -- MLP and CNN, written with torch.nn.functional and an explicit params dict ------------


def mlp_params():
    return {
        "fc1.weight": torch.randn(32, 20) * 0.2, "fc1.bias": torch.randn(32) * 0.1,
        "fc2.weight": torch.randn(16, 32) * 0.2, "fc2.bias": torch.randn(16) * 0.1,
        "fc3.weight": torch.randn(10, 16) * 0.2, "fc3.bias": torch.randn(10) * 0.1,
    }


def mlp_loss(p, x, y):
    h = F.relu(F.linear(x, p["fc1.weight"], p["fc1.bias"]))
    h = torch.tanh(F.linear(h, p["fc2.weight"], p["fc2.bias"]))
    logits = F.linear(h, p["fc3.weight"], p["fc3.bias"])
    return F.cross_entropy(logits, y)


def cnn_params():
    return {
        "conv1.weight": torch.randn(6, 1, 3, 3) * 0.3, "conv1.bias": torch.randn(6) * 0.1,
        "conv2.weight": torch.randn(8, 6, 3, 3) * 0.2, "conv2.bias": torch.randn(8) * 0.1,
        "fc.weight": torch.randn(10, 8 * 3 * 3) * 0.1, "fc.bias": torch.randn(10) * 0.1,
    }


def cnn_loss(p, x, y):
    h = F.max_pool2d(F.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"], padding=1)), 2)
    logits = F.linear(h.flatten(1), p["fc.weight"], p["fc.bias"])
    return F.nll_loss(F.log_softmax(logits, dim=-1), y)


def per_example(batch_loss):
    """The loss of one example: the model sees it as a minibatch of one."""

    def loss(p, x, y):
        return batch_loss(p, x.unsqueeze(0), y.unsqueeze(0))

    return loss


MODELS = {
    "mlp": (mlp_params, mlp_loss, (20,)),
    "cnn": (cnn_params, cnn_loss, (1, 14, 14)),
}


def model_inputs(name, batch_size=5):
    make_params, loss, example_shape = MODELS[name]
    torch.manual_seed(0)
    params = make_params()
    x = torch.randn(batch_size, *example_shape)
    y = torch.randint(0, 10, (batch_size,))
    return loss, params, x, y


@pytest.mark.parametrize("name", list(MODELS))
def test_per_sample_grads(name):
    loss, params, x, y = model_inputs(name)
    loss = per_example(loss)
    actual = ft.vmap(ft.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    expected = tf.vmap(tf.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    assert_close_dict(actual, expected)
    # And against the definition: one backward pass per example.
    for i in range(x.shape[0]):
        one = tf.grad(loss)(params, x[i], y[i])
        assert_close_dict({k: v[i] for k, v in actual.items()}, one, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_per_sample_grad_and_value_chunked(name):
    loss, params, x, y = model_inputs(name, batch_size=6)
    loss = per_example(loss)
    grads, values = ft.vmap(ft.grad_and_value(loss), in_dims=(None, 0, 0), chunk_size=4)(params, x, y)
    expected_grads, expected_values = tf.vmap(tf.grad_and_value(loss), in_dims=(None, 0, 0))(
        params, x, y)
    assert_close_dict(grads, expected_grads)
    torch.testing.assert_close(values, expected_values)


@pytest.mark.parametrize("name", list(MODELS))
def test_grad_of_vmapped_loss(name):
    loss, params, x, y = model_inputs(name)

    def total(vmap, p):
        return vmap(per_example(loss), in_dims=(None, 0, 0))(p, x, y).mean()

    actual = ft.grad(lambda p: total(ft.vmap, p))(params)
    expected = tf.grad(lambda p: total(tf.vmap, p))(params)
    assert_close_dict(actual, expected)


@pytest.mark.parametrize("name", list(MODELS))
def test_ensemble_of_models(name):
    """vmap over stacked parameters (batched weights) with a shared minibatch."""
    loss, params, x, y = model_inputs(name)
    torch.manual_seed(1)
    stacked = {k: torch.stack([v, torch.randn_like(v) * 0.1, v * 0.5]) for k, v in params.items()}

    actual = ft.vmap(ft.grad(loss), in_dims=(0, None, None))(stacked, x, y)
    expected = tf.vmap(tf.grad(loss), in_dims=(0, None, None))(stacked, x, y)
    assert_close_dict(actual, expected, atol=1e-5)


def test_readme_example_command_runs():
    # README's first command: the main example, in a fresh interpreter.
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "functransforms.examples.per_sample_grads"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ops that fell back to the per-example loop: none" in done.stdout
