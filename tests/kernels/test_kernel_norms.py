"""LayerNorm and RMSNorm kernels against a float64 reference (Triton interpreter on CPU, or a GPU)."""

import pytest
import torch
from kernel_checks import assert_matches_reference

from megatron_lite.kernels import layer_norm, reference, rms_norm
from megatron_lite.kernels import layernorm as layernorm_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params(hidden, dtype):
    weight = 1 + 0.1 * torch.randn(hidden, device=DEVICE, dtype=dtype)
    bias = 0.1 * torch.randn(hidden, device=DEVICE, dtype=dtype)
    return weight, bias


# Hidden sizes: not a power of two (100, 1000), tiny rows count, and the 16384 the spec asks for.
SHAPES = [((3, 5, 100), torch.float32), ((7, 256), torch.float16), ((9, 1000), torch.float16),
          ((3, 16384), torch.float32)]


@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_layer_norm_matches_float64_reference(shape, dtype):
    x = 2 * torch.randn(shape, device=DEVICE, dtype=dtype) + 0.5
    weight, bias = _params(shape[-1], dtype)
    assert_matches_reference(layer_norm, reference.layer_norm, [x, weight, bias])


@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_rms_norm_matches_float64_reference(shape, dtype):
    x = 2 * torch.randn(shape, device=DEVICE, dtype=dtype) + 0.5
    weight, _ = _params(shape[-1], dtype)
    assert_matches_reference(rms_norm, reference.rms_norm, [x, weight])


def test_layer_norm_without_bias():
    x = torch.randn(6, 200, device=DEVICE)
    weight, _ = _params(200, torch.float32)
    assert_matches_reference(lambda x, w: layer_norm(x, w, None), lambda x, w: reference.layer_norm(x, w, None),
                             [x, weight])


def test_bfloat16_matches_reference():
    x = torch.randn(5, 300, device=DEVICE, dtype=torch.bfloat16)
    weight, bias = _params(300, torch.bfloat16)
    assert_matches_reference(layer_norm, reference.layer_norm, [x, weight, bias])
    assert_matches_reference(rms_norm, reference.rms_norm, [x, weight])


def test_saved_statistics_are_float32_mean_and_rstd():
    x = torch.randn(4, 96, device=DEVICE, dtype=torch.float16)
    weight, bias = _params(96, torch.float16)
    _, mean, rstd = layernorm_module.norm_forward(x, weight, bias, 1e-5, is_rms=False)
    assert mean.dtype == rstd.dtype == torch.float32
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean(-1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(xd.var(-1, unbiased=False) + 1e-5), atol=1e-5, rtol=1e-5)


def test_mixed_precision_weights_keep_their_dtype():
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.float16, requires_grad=True)
    weight = torch.ones(64, device=DEVICE, dtype=torch.float32, requires_grad=True)
    y = rms_norm(x, weight)
    assert y.dtype == torch.float16
    y.sum().backward()
    assert x.grad.dtype == torch.float16 and weight.grad.dtype == torch.float32


def test_inputs_are_not_modified_and_strided_rows_work():
    base = torch.randn(6, 2 * 128, device=DEVICE)
    x = base[:, :128]  # every other 128-wide half: a row stride of 256
    weight, bias = _params(128, torch.float32)
    before = [t.clone() for t in (base, weight, bias)]
    assert_matches_reference(layer_norm, reference.layer_norm, [x, weight, bias])
    out = layer_norm(x.requires_grad_(False), weight, bias)
    for t, saved in zip((base, weight, bias), before):
        assert torch.equal(t, saved)
    assert out.data_ptr() not in (base.data_ptr(), x.data_ptr())


def test_weight_gradients_are_bitwise_deterministic():
    x = torch.randn(23, 300, device=DEVICE, dtype=torch.float16, requires_grad=True)
    weight, bias = (p.requires_grad_(True) for p in _params(300, torch.float16))
    grad_out = torch.randn_like(x)
    first = torch.autograd.grad(layer_norm(x, weight, bias), (x, weight, bias), grad_out)
    second = torch.autograd.grad(layer_norm(x, weight, bias), (x, weight, bias), grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_weight_gradient_sums_over_several_programs():
    # More row blocks than backward programs, so partial sums from several programs are added.
    x = torch.randn(11, 64, device=DEVICE)
    programs = layernorm_module._backward_programs(11, layernorm_module._candidates(64, 4, (32,))[0][0], x.device)
    assert 1 < programs < 11
    weight, _ = _params(64, torch.float32)
    assert_matches_reference(rms_norm, reference.rms_norm, [x, weight])


@pytest.mark.parametrize(
    "x_shape,w_shape,b_shape,eps,message",
    [
        ((4, 8), (7,), (8,), 1e-5, r"weight shape \(7,\) does not match the hidden size 8"),
        ((4, 8), (8,), (9,), 1e-5, r"bias shape \(9,\) does not match"),
        ((4, 8), (8,), (8,), 0.0, "eps must be positive"),
        ((4, 0), (0,), (0,), 1e-5, "non-empty last dimension"),
        ((2, 70000), (70000,), (70000,), 1e-5, "hidden size 70000 is above the supported 65536"),
    ],
)
def test_bad_arguments_are_rejected(x_shape, w_shape, b_shape, eps, message):
    x, w, b = (torch.randn(s, device=DEVICE) for s in (x_shape, w_shape, b_shape))
    with pytest.raises(ValueError, match=message):
        layer_norm(x, w, b, eps)


def test_integer_inputs_are_rejected():
    with pytest.raises(ValueError, match="supports float16, bfloat16 and float32 inputs"):
        rms_norm(torch.ones(2, 4, dtype=torch.int32, device=DEVICE), torch.ones(4, device=DEVICE))


@pytest.mark.parametrize("rows_per_block", [1, 2])
@pytest.mark.parametrize("is_rms", [True, False])
@pytest.mark.parametrize("shape", [(13, 40), (12, 64), (13, 64)])  # rows and columns masked or not
def test_backward_variants_equal_the_plain_one_bit_for_bit(rows_per_block, is_rms, shape):
    # The GPU tuner may pick a variant that loads the next rows before reducing the current
    # ones, reads the weight again for every row, reads each row twice, or has the compiler
    # stage the next rows in shared memory; each must compute the same sums in the same order.
    x = torch.randn(*shape, device=DEVICE)
    weight, bias = _params(shape[1], torch.float32)
    bias = None if is_rms else bias
    _, mean, rstd = layernorm_module.norm_forward(x, weight, bias, 1e-5, is_rms)
    dy = torch.randn_like(x)
    results = []
    for variant in layernorm_module.BACKWARD_VARIANTS:
        dx = torch.full_like(x, float("nan"))
        results.append(layernorm_module._backward_launch(dy, x, weight, mean, rstd, not is_rms, dx,
                                                         (rows_per_block, 4, 2, variant)))
    for plain, *variants in zip(*results):
        if plain is not None:
            assert all(torch.equal(plain, variant) for variant in variants)
    reference_fn = (lambda x, w: reference.rms_norm(x, w)) if is_rms else reference.layer_norm
    inputs = [x.double().requires_grad_(), weight.double().requires_grad_()] + ([] if is_rms else [bias.double().requires_grad_()])
    grads = torch.autograd.grad(reference_fn(*inputs), inputs, dy.double())
    for got, want in zip(results[1], grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
