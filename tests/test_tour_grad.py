"""The whirlwind tour's grad and vjp examples, verbatim but for the import line."""
import torch
import torch.func


def test_grad_example():
    from functransforms import grad

    x = torch.randn([])
    cos_x = grad(lambda x: torch.sin(x))(x)
    assert torch.allclose(cos_x, x.cos())

    # Second-order gradients
    neg_sin_x = grad(grad(lambda x: torch.sin(x)))(x)
    assert torch.allclose(neg_sin_x, -x.sin())


def test_per_sample_grad_example():
    from functransforms import grad, vmap

    batch_size, feature_size = 3, 5

    def model(weights,feature_vec):
        # Very simple linear model with activation
        assert feature_vec.dim() == 1
        return feature_vec.dot(weights).relu()

    def compute_loss(weights, example, target):
        y = model(weights, example)
        return ((y - target) ** 2).mean()  # MSELoss

    weights = torch.randn(feature_size, requires_grad=True)
    examples = torch.randn(batch_size, feature_size)
    targets = torch.randn(batch_size)
    inputs = (weights,examples, targets)
    grad_weight_per_example = vmap(grad(compute_loss), in_dims=(None, 0, 0))(*inputs)

    expected = torch.func.vmap(torch.func.grad(compute_loss), in_dims=(None, 0, 0))(*inputs)
    torch.testing.assert_close(grad_weight_per_example, expected)
    assert type(grad_weight_per_example) is torch.Tensor


def test_vjp_example():
    from functransforms import vjp

    inputs = torch.randn(3)
    func = torch.sin
    cotangents = (torch.randn(3),)

    outputs, vjp_fn = vjp(func, inputs); vjps = vjp_fn(*cotangents)

    expected_outputs, expected_vjp_fn = torch.func.vjp(func, inputs)
    torch.testing.assert_close(outputs, expected_outputs)
    torch.testing.assert_close(vjps, expected_vjp_fn(*cotangents))
