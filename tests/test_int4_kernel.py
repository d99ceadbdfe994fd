"""The 4-bit VNNI product against float64 products: of the weights it stores (dequantized), within
what rounding the activations to 8 bits allows, and of the original weights, within that plus the
weights' own rounding; the packing against its inverse."""

import pytest
import torch

from lckv_stream import int4_kernel
from lckv_stream.quantize import QuantizedLinear

needs_kernel = pytest.mark.skipif(not int4_kernel.available(), reason="no AVX512-VNNI kernel here "
                                  "(the CPU lacks it, or no C++ compiler)")

# The default model's products (N x K): fused q/k/v, o, gate/up, down, the output head; and a shape
# with a last tile of 2 weight rows and 5 blocks of 64 inputs.
MODEL_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576), (198, 320)]
FLOAT_SLACK = 1e-5  # float32 accumulation, relative to sum |x| |w|


def _weights(rows: int, columns: int) -> torch.Tensor:
    weight = torch.randn(rows, columns) * 0.05
    weight[1] *= 40  # one large row: per-group scales must not let it spoil the others
    weight[:, 7] += 0.2  # one column offset: groups whose minimum is far from zero
    return weight


def _activation_step(x: torch.Tensor) -> torch.Tensor:
    """Half the rounding step of each input: its block of 64's largest |x| / 127 / 2."""
    rows, columns = x.shape
    return (x.abs().view(rows, -1, 64).amax(-1) / 127 / 2).repeat_interleave(64, dim=1)


def test_packing_round_trips_and_rounds_each_weight_to_half_a_step():
    torch.manual_seed(0)
    for group in int4_kernel.GROUP_SIZES:
        weight = _weights(70, 256)
        q, scale, minimum = int4_kernel.quantize(weight, group)
        assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.dtype == minimum.dtype == torch.float16
        packed = int4_kernel.pack(q)
        assert packed.shape == (70, 128)
        assert torch.equal(int4_kernel.unpack(packed), q)
        error = (int4_kernel.dequantize(packed, scale, minimum) - weight).abs()
        # Half a step, and float16's rounding of the minimum and scale (a few 2^-11 of the group's size).
        half_step = (scale.float() / 2).repeat_interleave(group, dim=1)
        size = weight.view(70, -1, group).abs().amax(-1).repeat_interleave(group, dim=1)
        assert (error <= half_step + 2.0**-9 * size).all()


def test_the_kernel_order_pairs_each_lane_with_one_group_of_32():
    lanes = int4_kernel.ORDER.view(16, 4)  # VNNI lane l sums positions 4l .. 4l + 3
    assert sorted(int4_kernel.ORDER.tolist()) == list(range(64))
    assert ((lanes // 32) == torch.arange(16)[:, None] % 2).all()


@needs_kernel
@pytest.mark.parametrize("group", int4_kernel.GROUP_SIZES)
@pytest.mark.parametrize("shape", MODEL_SHAPES)
def test_products_match_float64_within_the_rounding_bound(shape, group):
    torch.manual_seed(0)
    rows, columns = shape
    weight = _weights(rows, columns)
    layer = QuantizedLinear(weight, None, "int4", group, vnni=True)
    assert layer.vnni
    stored = int4_kernel.dequantize(layer.qweight, layer.scale, layer.minimum).double()
    for batch in ((1, 8) if rows > 10_000 else range(1, 10)):  # whole and partial tiles of 4 tokens
        plain = torch.randn(batch, columns)
        outlier = plain.clone()
        outlier[:, 70] *= 30  # an outlier input: only its own block of 64 loses precision
        for x in (plain, outlier):
            got = layer(x).double()
            dx = _activation_step(x).double()
            slack = FLOAT_SLACK * (x.double().abs() @ stored.abs().T) + 1e-6
            # Against the weights it stores: only x is rounded, by at most half its block's step.
            exact = x.double() @ stored.T
            assert ((got - exact).abs() <= dx @ stored.abs().T + slack).all()
            # Against the float weights: their rounding too (|w - stored|, at most half a step each).
            reference = x.double() @ weight.double().T
            dw = (weight.double() - stored).abs()
            assert ((got - reference).abs() <= (x.double().abs() + dx) @ dw.T + dx @ stored.abs().T + slack).all()
        # The bounds are not vacuous: the typical error is a small fraction of the outputs' size
        # (int4 weights: a step is a fifteenth of a group's range, about 10% of a weight's size),
        # over the outputs of ordinary rows (the large row's would outweigh the others).
        got = layer(plain).double()[:, 2:]
        for want, most in ((plain.double() @ stored.T, 0.02), (plain.double() @ weight.double().T, 0.15)):
            want = want[:, 2:]
            assert ((got - want).pow(2).mean() / want.pow(2).mean()).sqrt().item() < most


@needs_kernel
def test_each_row_is_its_own_and_bfloat16_comes_back_as_bfloat16():
    torch.manual_seed(0)
    layer = QuantizedLinear(_weights(128, 192), torch.randn(128), "int4", 32, vnni=True)
    x = torch.randn(7, 192)
    together = layer(x)
    assert torch.equal(together, torch.cat([layer(x[i : i + 1]) for i in range(7)]))
    half = layer(x.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), layer(x.bfloat16().float()), rtol=0.01, atol=0.01)
    assert layer(x.view(7, 1, 192)).shape == (7, 1, 128)


@needs_kernel
def test_inputs_not_in_blocks_of_64_are_left_to_the_other_kernels():
    assert not int4_kernel.fits((64, 96), 32)
    assert not QuantizedLinear(torch.randn(64, 96), None, "int4", 32, vnni=True).vnni  # torch's int4 kernel
    layer = QuantizedLinear(torch.randn(64, 128), None, "int4", 32, vnni=True)
    with pytest.raises(RuntimeError, match="int4_linear"):
        torch.ops.lckv.int4_linear(torch.randn(1, 96), layer.qweight[:, :48], layer.scale[:, :3], layer.minimum[:, :3])


@needs_kernel
def test_the_compiler_sees_the_output_shape():
    layer = QuantizedLinear(torch.randn(64, 128), None, "int4", 64, vnni=True)
    torch.library.opcheck(torch.ops.lckv.int4_linear.default, (torch.randn(3, 128), layer.qweight, layer.scale,
                                                               layer.minimum), test_utils=("test_schema", "test_faketensor"))
