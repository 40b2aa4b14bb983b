"""vmap of fused scaled-dot-product attention, alone and inside per-sample gradients."""
import expecttest
import pytest
import torch
import torch.func as tf
import torch.nn as nn
import torch.nn.functional as F

import functransforms as ft


@pytest.mark.parametrize("mask", [None, "2d", "4d"])
@pytest.mark.parametrize("batched", ["all", "query"])
def test_sdpa_matches_torch_func(mask, batched):
    torch.manual_seed(0)
    q, k, v = torch.randn(4, 2, 5, 8), torch.randn(4, 2, 6, 8), torch.randn(4, 2, 6, 8)
    attn_mask = {None: None, "2d": torch.randn(5, 6), "4d": torch.randn(2, 2, 5, 6)}[mask]
    in_dims = (0, 0, 0) if batched == "all" else (0, None, None)
    k_in, v_in = (k, v) if batched == "all" else (k[0], v[0])

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    ft.reset_fallback_counts()
    torch.testing.assert_close(ft.vmap(f, in_dims=in_dims)(q, k_in, v_in),
                               tf.vmap(f, in_dims=in_dims)(q, k_in, v_in))
    assert ft.fallback_counts() == {}


def test_per_sample_grads_through_transformer_layer():
    torch.manual_seed(0)

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.head = nn.Linear(16, 5)

        def forward(self, tokens):
            return self.head(self.layer(self.emb(tokens.unsqueeze(0))).mean(1))

    model = Classifier().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    tokens, labels = torch.randint(0, 50, (6, 7)), torch.randint(0, 5, (6,))

    def per_sample(m):
        def loss(p, t, y):
            return F.cross_entropy(m.functional_call(model, p, (t,)), y.unsqueeze(0))
        return m.vmap(m.grad(loss), in_dims=(None, 0, 0))(params, tokens, labels)

    ft.reset_fallback_counts()
    ours, theirs = per_sample(ft), per_sample(tf)
    for k in params:
        torch.testing.assert_close(ours[k], theirs[k])
    assert ft.fallback_counts() == {}


class TestDropout(expecttest.TestCase):
    def test_dropout_needs_randomness_different(self):
        # With dropout, SDPA on CPU takes the math path, whose bernoulli_ meets the rule for
        # random ops; the fused kernel's own check covers backends that keep dropout fused.
        q = torch.randn(3, 1, 4, 8)

        def f(q):
            return F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)

        with self.assertRaises(RuntimeError) as ctx:
            ft.vmap(f)(q)
        self.assertExpectedInline(str(ctx.exception), """vmap: called random operation while in randomness error mode (aten::bernoulli_.float under vmap with randomness='error'). Pass randomness='different' for independent draws per example or randomness='same' for one draw shared by every example.""")
        out = ft.vmap(f, randomness="different")(q)
        assert out.shape == q.shape
