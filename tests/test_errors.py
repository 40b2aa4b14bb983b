"""The catalogue of refusals, plus the debugging aids (reprs, debug_unwrap).

Each refusal is checked word for word, then a successful transform call follows to show
the failure left nothing behind (conftest also checks that the level stack is empty).
"""
import warnings

import expecttest
import torch

import functransforms as ft

X = torch.arange(1.0, 4.0)


def check_still_works():
    torch.testing.assert_close(ft.vmap(ft.grad(lambda x: x.sin()))(X), X.cos())


class TestErrors(expecttest.TestCase):
    def message(self, exc_type, fn):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with self.assertRaises(exc_type) as err:
                fn()
        check_still_works()
        return str(err.exception)

    # -- vmap: values that cannot be batched ----------------------------------------------

    def test_item_under_vmap(self):
        msg = self.message(RuntimeError, lambda: ft.vmap(lambda x: x.item())(X))
        self.assertExpectedInline(msg, """vmap: aten::_local_scalar_dense.default turns a batched tensor into a Python number: it looks like you're calling .item() on a Tensor (or float(), int(), bool()) or attempting to use a Tensor in some data-dependent control flow (`if x.sum() > 0:`). Every example has its own value, so there is no single number to return. Keep the computation in tensors: use torch.where(cond, a, b) instead of `if`/`else`, or move the check outside vmap.""")

    def test_data_dependent_control_flow_under_vmap(self):
        msg = self.message(RuntimeError, lambda: ft.vmap(lambda x: x if x > 0 else -x)(X))
        self.assertExpectedInline(msg, """vmap: aten::_local_scalar_dense.default turns a batched tensor into a Python number: it looks like you're calling .item() on a Tensor (or float(), int(), bool()) or attempting to use a Tensor in some data-dependent control flow (`if x.sum() > 0:`). Every example has its own value, so there is no single number to return. Keep the computation in tensors: use torch.where(cond, a, b) instead of `if`/`else`, or move the check outside vmap.""")

    def test_tolist_under_vmap(self):
        msg = self.message(RuntimeError, lambda: ft.vmap(lambda x: torch.tensor(x.tolist()))(X))
        self.assertExpectedInline(msg, """vmap: .tolist() would turn a batched tensor into Python numbers, but every example has its own values. Keep the computation in tensors, or return the tensor from the vmapped function and call .tolist() on the result.""")

    def test_inplace_into_unbatched(self):
        msg = self.message(RuntimeError, lambda: ft.vmap(lambda x: torch.zeros(()).add_(x))(X))
        self.assertExpectedInline(msg, """vmap: aten::add_.Tensor is an in-place operation that would write batched values into a tensor that is not batched (inplace aten::add_.Tensor(self, *extra_args) is not possible because there exists a Tensor `other` in extra_args that has more elements than `self`). Use the out-of-place version (for example `y = x + z` instead of `x += z`), or make the written tensor batched too.""")

    def test_random_with_randomness_error(self):
        msg = self.message(RuntimeError, lambda: ft.vmap(lambda x: x + torch.rand_like(x))(X))
        self.assertExpectedInline(msg, """vmap: called random operation while in randomness error mode (aten::rand_like.default under vmap with randomness='error'). Pass randomness='different' for independent draws per example or randomness='same' for one draw shared by every example.""")

    def test_bad_randomness(self):
        msg = self.message(RuntimeError, lambda: ft.vmap(torch.sin, randomness="fresh"))
        self.assertExpectedInline(msg, """vmap: randomness must be one of ('error', 'different', 'same'), got 'fresh'.""")

    # -- vmap: in_dims / out_dims -----------------------------------------------------------

    def test_mismatched_batch_sizes(self):
        msg = self.message(ValueError, lambda: ft.vmap(torch.add)(X, torch.ones(4)))
        self.assertExpectedInline(msg, """vmap(add, in_dims=0, out_dims=0)(<inputs>): Expected all tensors to have the same size in the mapped dimension, got sizes [3, 4] for the mapped inputs. Map over dimensions of one size, or pass the odd input with in_dim None.""")

    def test_in_dim_out_of_range(self):
        msg = self.message(ValueError, lambda: ft.vmap(torch.sin, in_dims=1)(X))
        self.assertExpectedInline(msg, """vmap(sin, in_dims=1, out_dims=0)(<inputs>): Got in_dim=1 for some input, but that input is a Tensor of dimensionality 1; in_dim must satisfy -1 <= in_dim < 1.""")

    def test_in_dims_wrong_length(self):
        msg = self.message(ValueError, lambda: ft.vmap(torch.add, in_dims=(0,))(X, X))
        self.assertExpectedInline(msg, """vmap(add, in_dims=(0,), out_dims=0)(<inputs>): in_dims is not compatible with the structure of `inputs`: in_dims has 1 entries but 2 positional argument(s) were passed. Give one in_dim per positional argument.""")

    def test_in_dim_for_non_tensor(self):
        msg = self.message(ValueError, lambda: ft.vmap(lambda x, n: x * n, in_dims=(0, 0))(X, 2))
        self.assertExpectedInline(msg, """vmap(<lambda>, in_dims=(0, 0), out_dims=0)(<inputs>): Got in_dim=0 for an input but the input is of type int. vmap can only map over Tensors; use None as the in_dim of non-Tensor inputs.""")

    def test_nothing_mapped(self):
        msg = self.message(ValueError, lambda: ft.vmap(torch.sin, in_dims=None)(X))
        self.assertExpectedInline(msg, """vmap(sin, in_dims=None, out_dims=0)(<inputs>): at least one Tensor must be mapped over, but all in_dims were None or no Tensor was passed. Give a Tensor input an integer in_dim.""")

    def test_out_dims_wrong_structure(self):
        msg = self.message(ValueError, lambda: ft.vmap(lambda x: (x, x), out_dims=(0, 0, 0))(X))
        self.assertExpectedInline(msg, """vmap(<lambda>, in_dims=0, out_dims=(0, 0, 0))(<inputs>): out_dims is not compatible with the structure of `outputs`. out_dims must be a prefix of the outputs' pytree structure (*, *).""")

    def test_in_dims_wrong_structure(self):
        msg = self.message(
            ValueError, lambda: ft.vmap(lambda p: p[0] + p[1], in_dims=((0, 0, 0),))((X, X))
        )
        self.assertExpectedInline(msg, """vmap(<lambda>, in_dims=((0, 0, 0),), out_dims=0)(<inputs>): in_dims is not compatible with the structure of `inputs`. in_dims must be a prefix of the inputs' pytree structure ((*, *),).""")

    def test_out_dim_out_of_range(self):
        msg = self.message(IndexError, lambda: ft.vmap(lambda x: x, out_dims=2)(X))
        self.assertExpectedInline(msg, """vmap(<lambda>, in_dims=0, out_dims=2)(<inputs>): Dimension out of range: out_dim=2 is out of range for an output with 0 dims per example (expected -1 <= out_dim < 1).""")

    def test_out_dims_on_non_tensor_output(self):
        msg = self.message(ValueError, lambda: ft.vmap(lambda x: (x, 1.0), out_dims=(0, 0))(X))
        self.assertExpectedInline(msg, """vmap(<lambda>, in_dims=0, out_dims=(0, 0))(<inputs>): `f` must only return Tensors, got type <class 'float'>. Set its out_dim to None to return it unbatched.""")
        # The fix the message suggests works.
        out, one = ft.vmap(lambda x: (x, 1.0), out_dims=(0, None))(X)
        self.assertEqual(one, 1.0)

    def test_out_dims_none_on_batched_output(self):
        msg = self.message(ValueError, lambda: ft.vmap(lambda x: x, out_dims=None)(X))
        self.assertExpectedInline(msg, """vmap(<lambda>, in_dims=0, out_dims=None)(<inputs>): out_dims is None for an output that depends on the mapped inputs (vmap can not return a BatchedTensor when out_dim is None). Only outputs that are the same for every example can use out_dims=None.""")

    # -- grad -------------------------------------------------------------------------------

    def test_grad_of_non_scalar(self):
        msg = self.message(RuntimeError, lambda: ft.grad(lambda x: x)(X))
        self.assertExpectedInline(msg, """grad_and_value(f)(*args): expected f(*args) to return a scalar Tensor, got a tensor with 1 dims. Use vjp or jacrev for non-scalar outputs, or reduce the output (e.g. .sum()) first.""")

    def test_grad_of_non_tensor(self):
        msg = self.message(RuntimeError, lambda: ft.grad(lambda x: 1.0)(X))
        self.assertExpectedInline(msg, """grad_and_value(f)(*args): expected f(*args) to return a Tensor, got float.""")

    def test_vjp_complex_cotangent_for_real_output(self):
        _, vjp_fn = ft.vjp(torch.sin, X)
        msg = self.message(RuntimeError, lambda: vjp_fn(X.to(torch.complex64)))
        self.assertExpectedInline(msg, """vjp_fn: a cotangent has dtype torch.complex64 but the output it belongs to has dtype torch.float32; a complex output needs a complex cotangent and a real output a real one.""")

    def test_grad_of_complex_output(self):
        msg = self.message(RuntimeError, lambda: ft.grad(lambda x: (x * 1j).sum())(X))
        self.assertExpectedInline(msg, """grad_and_value(f)(*args): expected f(*args) to return a real scalar, got dtype torch.complex64. Differentiate its real part (.real) or absolute value instead.""")

    def test_has_aux_without_tuple(self):
        msg = self.message(RuntimeError, lambda: ft.grad(lambda x: x.sum(), has_aux=True)(X))
        self.assertExpectedInline(msg, """grad_and_value(f)(*args): output of function f should be a tuple: (output, aux) if has_aux is True, got Tensor.""")

    def test_has_aux_with_three_outputs(self):
        msg = self.message(
            RuntimeError, lambda: ft.grad(lambda x: (x.sum(), 1, 2), has_aux=True)(X)
        )
        self.assertExpectedInline(msg, """grad_and_value(f)(*args): output of function f should be a tuple: (output, aux) if has_aux is True, got tuple.""")

    def test_grad_of_int_tensor(self):
        msg = self.message(RuntimeError, lambda: ft.grad(lambda x: x.sum())(torch.arange(3)))
        self.assertExpectedInline(msg, """grad_and_value: can only differentiate with respect to floating point or complex Tensors, got an input of dtype torch.int64. Convert it (e.g. x.float()) or do not differentiate with respect to it.""")

    def test_bad_argnums(self):
        msg = self.message(RuntimeError, lambda: ft.grad(torch.dot, argnums=2)(X, X))
        self.assertExpectedInline(msg, """grad_and_value: got argnum=2, but only 2 positional inputs were given. Each argnum must satisfy -2 <= argnum < 2.""")

    def test_argnums_catalogue(self):
        msgs = [self.message(RuntimeError, lambda a=a: ft.grad(torch.dot, argnums=a)(X, X))
                for a in [(), 0.0, (0, "1"), (0, -2)]]
        self.assertExpectedInline("\n".join(msgs), """\
grad_and_value: argnums must be non-empty: pass an int or a tuple of at least one int.
grad_and_value: argnums must be int or Tuple[int, ...] (an int or a non-empty tuple of ints), got 0.0.
grad_and_value: each argnum must be int, got '1' of type str in argnums=(0, '1').
grad_and_value: argnums elements must be unique, got argnums=(0, -2), which names the same argument twice.""")

    def test_empty_output(self):
        msg = self.message(RuntimeError, lambda: ft.vjp(lambda x: None, X))
        self.assertExpectedInline(msg, """vjp(f, *primals): Expected f to be a function that has non-empty output (got an output with no Tensors). Return at least one Tensor.""")
        msg = self.message(RuntimeError, lambda: ft.jvp(lambda x: (), (X,), (X,)))
        self.assertExpectedInline(msg, """jvp(f, primals, tangents): Expected f to be a function that has non-empty output (got an output with no Tensors). Return at least one Tensor.""")

    def test_non_tensor_aux(self):
        msg = self.message(
            RuntimeError, lambda: ft.grad(lambda x: (x.sum(), [x, 1]), has_aux=True)(X)
        )
        self.assertExpectedInline(msg, """grad_and_value(f)(*args): the aux output of f must be a pytree of Tensors. Expected tensors, got unsupported type <class 'int'>. Return Python values through a closure or a global instead.""")

    def test_jvp_strict(self):
        msg = self.message(RuntimeError, lambda: ft.jvp(torch.sin, (X,), (X,), strict=True))
        self.assertExpectedInline(msg, """jvp(f, primals, tangents, strict=True): strict mode is not yet implemented (as in torch.func). Call jvp without strict.""")

    def test_requires_grad_inside_transform(self):
        msg = self.message(RuntimeError, lambda: ft.vmap(lambda x: x.requires_grad_())(X))
        self.assertExpectedInline(msg, """Tensor.requires_grad_() was called (perhaps by torch.autograd.functional.* APIs) on a tensor inside a functransforms transform (grad, vjp, vmap, jvp, ...). Inside a transform, use the transforms themselves (ft.grad, ft.vjp, ft.jacrev, ft.jacfwd, ft.hessian) instead, or call requires_grad_() outside the transformed function.""")

    def test_retain_grad_inside_transform(self):
        msg = self.message(RuntimeError, lambda: ft.grad(lambda x: (x.retain_grad(), x.sum())[1])(X))
        self.assertExpectedInline(msg, """Tensor.retain_grad() was used on a tensor inside a functransforms transform (grad, vjp, vmap, jvp, ...). Inside a transform, gradients are return values: use ft.grad or ft.vjp on the function instead, or call Tensor.retain_grad() outside the transform.""")

    def test_saved_tensor_hooks_under_grad(self):
        def f(x):
            with torch.autograd.graph.save_on_cpu():
                return x.sin().sum()

        msg = self.message(RuntimeError, lambda: ft.grad(f)(X))
        self.assertExpectedInline(msg, """Grad transforms (grad, vjp, jacrev, hessian, ...) don't support saved tensor hooks (torch.func transforms don't yet support saved tensor hooks either): the hooks would see the transform's internal tensors. Use the hooks (e.g. save_on_cpu) outside the transformed function and around no transform call, or drop them.""")

    def test_captured_inplace_under_grad(self):
        captured = torch.zeros(3)

        def f(x):
            captured.add_(x)
            return x.sum()

        msg = self.message(RuntimeError, lambda: ft.grad(f)(X))
        self.assertExpectedInline(msg, """During a grad transform (grad, vjp, jacrev, ...), the function called the in-place operation aten::add_.Tensor that would mutate a captured Tensor (one from outside the transform). Its gradient would be lost. Pass that tensor as an input of the transformed function, or use the out-of-place version of the operation.""")

    def test_vjp_cotangent_shape(self):
        _, vjp_fn = ft.vjp(torch.sin, X)
        msg = self.message(RuntimeError, lambda: vjp_fn(torch.ones(4)))
        self.assertExpectedInline(msg, """vjp_fn: a cotangent has shape (4,) but the output it belongs to has shape (3,).""")

    # -- torch autograd used inside a transform -----------------------------------------------

    def test_backward_inside_grad(self):
        def f(x):
            x.sin().sum().backward()
            return x.sum()

        msg = self.message(RuntimeError, lambda: ft.grad(f)(X))
        self.assertExpectedInline(msg, """.backward() was used on a tensor inside a functransforms transform (grad, vjp, vmap, jvp, ...). Inside a transform, gradients are return values: use ft.grad or ft.vjp on the function instead, or call .backward() outside the transform.""")

    def test_backward_inside_vmap(self):
        x = X.clone().requires_grad_()

        def f(x):
            x.sin().sum().backward()
            return x

        msg = self.message(RuntimeError, lambda: ft.vmap(f)(x))
        self.assertExpectedInline(msg, """.backward() was used on a tensor inside a functransforms transform (grad, vjp, vmap, jvp, ...). Inside a transform, gradients are return values: use ft.grad or ft.vjp on the function instead, or call .backward() outside the transform.""")
        # Outside the transform, torch autograd through it works as usual.
        ft.vmap(torch.sin)(x).sum().backward()
        torch.testing.assert_close(x.grad, X.cos())

    def test_grad_attribute_inside_grad(self):
        def f(x):
            return x.sum() * (0 if x.grad is None else 1)

        msg = self.message(RuntimeError, lambda: ft.grad(f)(X))
        self.assertExpectedInline(msg, """.grad was used on a tensor inside a functransforms transform (grad, vjp, vmap, jvp, ...). Inside a transform, gradients are return values: use ft.grad or ft.vjp on the function instead, or call .grad outside the transform.""")


class TestDebugging(expecttest.TestCase):
    def test_reprs(self):
        seen = []

        def record(x):
            seen.append(repr(x))
            return x

        ft.vmap(ft.grad(lambda x: record(x).sum()))(torch.arange(4.0).view(2, 2))
        ft.jvp(record, (torch.arange(2.0),), (torch.ones(2),))
        ft.functionalize(record)(torch.arange(2.0))
        self.assertExpectedInline("\n".join(seen), """\
GradTrackingTensor(lvl=2, value=BatchedTensor(lvl=1, bdim=0, value=tensor([[0., 1.],
        [2., 3.]])))
DualTensor(lvl=1, primal=tensor([0., 1.]), tangent=tensor([1., 1.]))
FunctionalTensor(lvl=1, value=tensor([0., 1.]))""")

    def test_debug_unwrap(self):
        seen = []

        def record(x):
            seen.append((ft.debug_unwrap(x, recurse=False), ft.debug_unwrap(x)))
            return x.sum()

        x = torch.arange(4.0).view(2, 2)
        ft.vmap(ft.grad(record))(x)
        one_level, plain = seen[0]
        self.assertExpectedInline(repr(one_level), """\
BatchedTensor(lvl=1, bdim=0, value=tensor([[0., 1.],
        [2., 3.]]))""")
        self.assertIs(type(plain), torch.Tensor)
        self.assertIs(plain, x)
        self.assertIs(ft.debug_unwrap(x), x)
