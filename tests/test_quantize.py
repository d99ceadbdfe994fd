"""Quantized matrix products against float64 products of the original weights, within the bound
their rounding allows; the quantized model against the float32 one (logits, greedy tokens)."""

import copy

import pytest
import torch

from app_support.tiny import tiny_model
from lckv_stream import cla_map, int8_kernel
from lckv_stream.quantize import QuantizationSettings, QuantizedLinear, quantize_model, quantized_copy

needs_vnni = pytest.mark.skipif(not int8_kernel.available(), reason="no AVX512-VNNI kernel here "
                                "(the CPU lacks it, or no C++ compiler)")

BF16_EPS = 2.0**-8  # relative rounding error of bfloat16 (8 significant bits), with margin


def _error_bound(x: torch.Tensor, weight: torch.Tensor, step: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """What weight rounding (at most half a `step` per weight) and bfloat16 (inputs, and the output)
    may cost each output: sum_k |x_k| (step_nk / 2 + eps |w_nk|) + eps |y_n|."""
    x = x.double().abs()
    per_weight = step.double() / 2 + BF16_EPS * (weight.double().abs() + step.double())
    return x @ per_weight.T + BF16_EPS * reference.abs()


@pytest.mark.parametrize("fmt,group", [("int8", 32), ("int4", 32), ("int4", 64)])
def test_quantized_products_match_float64_within_the_rounding_bound(fmt, group):
    torch.manual_seed(0)
    weight = torch.randn(192, 256) * 0.05
    weight[3] *= 40  # one large row: per-row / per-group scales must not let it spoil the others
    x = torch.randn(5, 256)
    layer = QuantizedLinear(weight, None, fmt, group, vnni=False)
    reference = x.double() @ weight.double().T
    if fmt == "int8":
        step = (weight.abs().amax(dim=1, keepdim=True) / 127).expand_as(weight)
    else:
        groups = weight.view(192, -1, group)
        step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(group, dim=1)
    error = (layer(x).double() - reference).abs()
    assert layer(x).dtype == torch.float32
    assert (error <= _error_bound(x, weight, step, reference)).all()
    # The bound is not vacuous: the typical error is a small fraction of the outputs' size.
    relative = (error.pow(2).mean() / reference.pow(2).mean()).sqrt().item()
    assert relative < (0.02 if fmt == "int8" else 0.15)


@needs_vnni
@pytest.mark.parametrize("rows", [1, 3, 4, 9])  # whole and partial tiles of 4 tokens
def test_vnni_products_match_float64_within_the_rounding_bound(rows):
    """Weights rounded to half a step of their row's scale, and x to half a step of its block's
    (64 inputs): |y - x W^T| <= sum_k (|x_k| + dx_k) dw_k + |w_k| dx_k, plus float32 rounding."""
    torch.manual_seed(0)
    weight = torch.randn(196, 320) * 0.05  # 196 rows: a last tile of 4 weight rows... and 320 = 5 blocks
    weight[3] *= 40
    x = torch.randn(rows, 320)
    x[:, 70] *= 30  # an outlier input: only its own block of 64 loses precision
    layer = QuantizedLinear(weight, None, "int8", vnni=True)
    assert layer.vnni
    got = layer(x).double()
    reference = x.double() @ weight.double().T
    dw = (weight.abs().amax(dim=1, keepdim=True) / 127 / 2).expand_as(weight).double()
    dx = (x.abs().view(rows, 5, 64).amax(-1) / 127 / 2).repeat_interleave(64, dim=1).double()
    bound = (x.double().abs() + dx) @ dw.T + dx @ weight.double().abs().T + 1e-5 * reference.abs() + 1e-6
    assert ((got - reference).abs() <= bound).all()
    relative = ((got - reference).pow(2).mean() / reference.pow(2).mean()).sqrt().item()
    assert relative < 0.02


@needs_vnni
def test_vnni_takes_bfloat16_and_batched_rows_alike():
    """Each row is quantized on its own: a row's result does not depend on the rows beside it."""
    weight = torch.randn(128, 192) * 0.1
    layer = QuantizedLinear(weight, None, "int8", vnni=True)
    x = torch.randn(7, 192)
    together = layer(x)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(7)])
    assert torch.equal(together, alone)
    half = layer(x.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), layer(x.bfloat16().float()), rtol=0.01, atol=0.01)


@needs_vnni
@pytest.mark.parametrize("rows", [4, 8, 16, 21, 40])
def test_amx_products_are_the_vnni_products_bit_for_bit(rows):
    """Where the CPU has AMX, products of 4 rows or more go through it: the same integer sums per
    block of 64, scaled in the same order, so the floats equal VNNI's (a row's tokens do not depend
    on which batch it steps in). 208 weight rows: 13 groups of 16, an odd one at the end."""
    if not int8_kernel.use_amx(True):
        pytest.skip("no AMX on this CPU (or the OS does not allow it): VNNI serves every shape")
    torch.manual_seed(rows)
    weight = torch.randn(208, 320) * 0.05
    layer = QuantizedLinear(weight, None, "int8", vnni=True)
    x = torch.randn(rows, 320)
    x[:, 70] *= 30
    for inputs in (x, x.bfloat16()):
        amx = layer(inputs)
        try:
            assert not int8_kernel.use_amx(False)
            vnni = layer(inputs)
        finally:
            int8_kernel.use_amx(True)
        assert torch.equal(amx, vnni)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(rows)])  # one row: VNNI
    assert torch.equal(layer(x), alone)


def test_vnni_is_not_used_for_inputs_it_cannot_take():
    layer = QuantizedLinear(torch.randn(64, 96), None, "int8", vnni=True)  # 96 is not a multiple of 64
    assert not layer.vnni


@pytest.mark.parametrize("vnni", [False, pytest.param(True, marks=needs_vnni)])
def test_int8_keeps_a_bias_and_the_input_shape(vnni):
    weight, bias = torch.randn(64, 64), torch.randn(64)
    layer = QuantizedLinear(weight, bias, "int8", vnni=vnni)
    x = torch.randn(2, 3, 64)
    out = layer(x)
    assert out.shape == (2, 3, 64)
    torch.testing.assert_close(out, x @ weight.T + bias, rtol=0.03, atol=0.05 * (x @ weight.T).abs().max().item())


def test_shapes_the_int4_kernel_cannot_take_are_refused():
    with pytest.raises(ValueError, match="int4"):
        QuantizedLinear(torch.randn(48, 64), None, "int4", 32)  # rows not in blocks of 64
    with pytest.raises(ValueError, match="group_size"):
        QuantizationSettings("int4", "int8", 48)


def _logits(model, prompt):
    with torch.inference_mode():
        return model(prompt).logits.float()


@pytest.mark.parametrize("fmt,kernel", [("int8", "torch"), pytest.param("int8", "vnni", marks=needs_vnni),
                                        ("int4", "torch"), pytest.param("int4", "vnni", marks=needs_vnni)])
def test_quantized_model_follows_the_float_model(fmt, kernel):
    """Teacher-forced over fixed prompts: the top token agrees wherever the float model's margin
    between its first and second choice exceeds the quantized logits' largest deviation."""
    model = tiny_model(cla_map(4, 2), hidden_size=128, intermediate_size=256, vocab_size=320)
    quantized = copy.deepcopy(model)
    assert quantize_model(quantized, QuantizationSettings(fmt, "int8", 32, kernel)).weights == fmt
    prompts = torch.randint(0, 320, (8, 24), generator=torch.Generator().manual_seed(3))
    want, got = _logits(model, prompts), _logits(quantized, prompts)
    deviation = (got - want).abs().amax(-1)
    top2 = want.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * deviation
    agree = got.argmax(-1) == want.argmax(-1)
    assert agree[clear].all()
    assert agree.float().mean() > (0.95 if fmt == "int8" else 0.8)
    assert (deviation / want.abs().amax(-1)).max() < (0.05 if fmt == "int8" else 0.25)


def test_quantize_model_runs_once_and_drops_the_float_weights():
    model = tiny_model(cla_map(4, 2))
    settings = quantize_model(model, QuantizationSettings("int8", kernel="torch"))
    assert quantize_model(model, QuantizationSettings("int4")) is settings  # the second call changes nothing
    for layer in model.model.layers:
        attention = layer.self_attn
        assert isinstance(attention.o_proj, QuantizedLinear) and isinstance(layer.mlp.down_proj, QuantizedLinear)
        assert isinstance(attention.qkv_proj if attention.computes_kv else attention.q_proj, QuantizedLinear)
        assert not hasattr(layer.mlp, "gate_proj")
    assert isinstance(model.lm_head, QuantizedLinear)
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for n, p in model.named_parameters() if "embed" not in n)


@pytest.mark.parametrize("kernel", ["torch", pytest.param("vnni", marks=needs_vnni)])
def test_the_attention_projections_may_keep_their_own_format(kernel):
    model = tiny_model(cla_map(4, 2), hidden_size=128, intermediate_size=256, vocab_size=320)
    quantize_model(model, QuantizationSettings("int4", "int8", 32, kernel, attention="int8"))
    for layer in model.model.layers:
        attention = layer.self_attn
        projections = [attention.o_proj, attention.qkv_proj if attention.computes_kv else attention.q_proj]
        assert all(p.format == "int8" for p in projections)
        assert layer.mlp.gate_up_proj.format == layer.mlp.down_proj.format == "int4"
        assert layer.mlp.down_proj.vnni == (kernel == "vnni")
    assert model.lm_head.format == "int8"


def test_quantized_copy_leaves_the_float_model_as_it_is():
    model = tiny_model(cla_map(4, 2))
    before = {name: p.clone() for name, p in model.named_parameters()}
    fast = quantized_copy(model, QuantizationSettings("int8", kernel="torch"), torch.bfloat16)
    assert fast is not model and fast.dtype == torch.bfloat16 and model.dtype == torch.float32
    assert isinstance(model.lm_head, torch.nn.Linear) and hasattr(model.model.layers[0].mlp, "gate_proj")
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    same = quantized_copy(model, QuantizationSettings("int8", kernel="torch"))  # the model's dtype: shared
    assert same.model.embed_tokens.weight is model.model.embed_tokens.weight


def test_settings_name_the_formats():
    assert QuantizationSettings("int8", kernel="torch").label == "int8"
    assert QuantizationSettings("int4", "int8", 32, "torch").label == "int4-g32, head int8"
    assert QuantizationSettings("int4", "int4", 64, "torch").label == "int4-g64"
    assert QuantizationSettings("int4", "int8", 32, "torch", "int8").label == "int4-g32, attention int8, head int8"
    if int8_kernel.available():
        assert QuantizationSettings("int8").label == "int8 VNNI"
        assert QuantizationSettings("int4", "int4", 64).label == "int4-g64 VNNI"
    with pytest.raises(ValueError, match="kernel"):
        QuantizationSettings(kernel="fast")


def test_the_kernel_layout_round_trips_and_pads_to_whole_groups_of_16_rows():
    """`pack` puts 4 inputs of 16 rows in each 64 bytes; `block_sums` holds where each block's
    integer sums start (-128 x its weights' sum), in the same row groups."""
    q = torch.randint(-127, 128, (20, 128), dtype=torch.int8)
    packed = int8_kernel.pack(q)
    assert packed.shape == (2, 32, 16, 4)
    assert torch.equal(packed[1, 5, 2], q[18, 20:24])  # group 1, inputs 20-23 of its row 2
    assert torch.equal(int8_kernel.unpack(packed, 20), q)
    assert (int8_kernel.unpack(packed, 32)[20:] == 0).all()
    sums = int8_kernel.block_sums(q)
    assert sums.shape == (2, 2, 16) and sums.dtype == torch.int32
    assert sums[0, 1, 3].item() == -128 * q[3, 64:].sum().item() and (sums[1, :, 4:] == 0).all()


def test_a_kernel_build_killed_midway_does_not_hang_the_next_start(tmp_path):
    """torch marks a build in progress with a `lock` file and waits while it exists; a process killed
    while building (Ctrl-C at the first start) leaves it behind. Under the build's OS lock, which
    died with that process, the leftover goes and the build proceeds."""
    (tmp_path / "lock").write_text("")
    with int8_kernel._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
        (tmp_path / "lock").write_text("")  # torch's own marker during the build
    assert (tmp_path / "build.flock").exists()
