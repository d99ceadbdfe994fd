"""Quantized matrix products for decoding on a CPU.

One decoded token multiplies a single hidden state by every weight matrix, so on a CPU the step is
bound by reading the weights (4 bytes a weight in float32) and by turning them into numbers to
multiply. `quantize_model` stores the weights of every projection and of the output head in 8 bits
(one scale per output row) or 4 bits (a scale and an offset per group of input columns), fused where
two or three products read the same input (q/k/v, gate/up). int8 products run on this project's
AVX512-VNNI kernel where the CPU has it (`int8_kernel.py`: activations quantized to 8 bits per block
of 64 too), else on torch's weight-only kernel in bfloat16 (`aten._weight_int8pack_mm`); int4 on the
project's 4-bit VNNI kernel (`int4_kernel.py`) likewise, else on `aten._weight_int4pack_mm_for_cpu`. Norms, embeddings and attention keep their dtype. The quantized
model serves inference only (no gradients).
"""

from __future__ import annotations

import copy
import itertools
import threading
from dataclasses import dataclass

import torch
from torch import nn

from . import int4_kernel, int8_kernel

FORMATS = ("int8", "int4")
KERNELS = ("auto", "vnni", "torch")  # auto = the VNNI kernels where the CPU has them
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel accepts
COMPUTE_DTYPE = torch.bfloat16  # the kernels' fast input type (float32 inputs take a slow path)


@dataclass(frozen=True)
class QuantizationSettings:
    """How the weights are stored: `weights` for the layers' projections, `attention` for the
    attention projections (q/k/v and o) where they differ from the MLP's (None: as `weights`), `head`
    for the output head (its 49k rows are a fifth of the model's weights; it decides the logits
    directly). `group_size`: inputs per scale of the int4 formats."""

    weights: str = "int8"
    head: str = "int8"
    group_size: int = 32
    kernel: str = "auto"
    attention: str | None = None

    def __post_init__(self) -> None:
        for value in (self.weights, self.head, self.attention_format):
            if value not in FORMATS:
                raise ValueError(f"quantization format must be one of {FORMATS}, got {value!r}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")

    @property
    def attention_format(self) -> str:
        return self.weights if self.attention is None else self.attention

    @property
    def vnni(self) -> bool:
        """Whether products use the VNNI kernels (builds them on first use)."""
        if self.kernel == "vnni" and not int8_kernel.available():
            raise RuntimeError(f"the VNNI kernel is not available: {int8_kernel.unavailable_reason()}")
        return self.kernel != "torch" and int8_kernel.available()

    @property
    def label(self) -> str:
        """Short name for the UI, e.g. 'int8 VNNI' or 'int4-g32, attention int8, head int8 VNNI'."""
        def name(fmt: str) -> str:
            return f"int4-g{self.group_size}" if fmt == "int4" else fmt

        text = name(self.weights)
        if self.attention_format != self.weights:
            text += f", attention {name(self.attention_format)}"
        if self.head != self.weights:
            text += f", head {name(self.head)}"
        return text + (" VNNI" if self.vnni else "")


class QuantizedLinear(nn.Module):
    """y = x W^T (+ b) with W stored in 8 or 4 bits; y has x's dtype.

    int8: W ~ q * scale, q in [-127, 127], one scale per output row (symmetric). With `vnni` the
    product runs on the VNNI kernel (x quantized per block of 64 inputs), else in bfloat16.
    int4: W ~ q * scale + minimum, q in [0, 15], per row and group of `group_size` inputs (min-max
    over the group). With `vnni` (groups of 32 or 64) in the VNNI kernel's layout (`int4_kernel.py`,
    x quantized per block of 64), else in the layout `aten._weight_int4pack_mm_for_cpu` reads (in
    bfloat16, the minimum as an offset at q = 8).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, group_size: int = 32,
                 vnni: bool = False) -> None:
        super().__init__()
        weight = weight.detach().float()
        self.out_features, self.in_features = weight.shape
        self.format = fmt
        self.group_size = group_size
        if fmt == "int4":
            self.vnni = vnni and int4_kernel.fits(weight.shape, group_size) and int4_kernel.available()
        else:
            self.vnni = vnni and int8_kernel.fits(self.in_features) and int8_kernel.available()
        if fmt == "int4" and self.vnni:
            q, scale, minimum = int4_kernel.quantize(weight, group_size)
            self.register_buffer("qweight", int4_kernel.pack(q))
            self.register_buffer("scale", scale)
            self.register_buffer("minimum", minimum)
        elif fmt == "int8":
            scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
            qweight = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
            if self.vnni:  # in the kernel's layout (int8_kernel.pack)
                self.register_buffer("qweight", int8_kernel.pack(qweight))
                self.register_buffer("scale", int8_kernel.padded_scale(scale))
                self.register_buffer("block_sums", int8_kernel.block_sums(qweight))
            else:
                self.register_buffer("qweight", qweight)
                self.register_buffer("scale", scale.to(COMPUTE_DTYPE))
                self.register_buffer("block_sums", None)
        elif fmt == "int4":
            if not fits_int4(weight.shape, group_size):
                raise ValueError(f"a {tuple(weight.shape)} weight cannot be packed in int4 groups of {group_size}")
            groups = weight.view(self.out_features, -1, group_size)
            low, high = groups.amin(dim=-1), groups.amax(dim=-1)
            scale = ((high - low) / 15).clamp(min=1e-12)
            q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q.view(self.out_features, self.in_features), 1))
            # [groups, out, 2]: the kernel's (scale, offset) of each group, offset = value at q = 8.
            scale_and_offset = torch.stack((scale, low + 8 * scale), dim=-1).transpose(0, 1).contiguous()
            self.register_buffer("scale", scale_and_offset.to(COMPUTE_DTYPE))
        else:
            raise ValueError(f"unknown quantization format {fmt!r}")
        self.register_buffer("bias", None if bias is None else bias.detach().to(COMPUTE_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.vnni:  # takes x in float32 or bfloat16 as it comes
            flat = x.reshape(-1, self.in_features)
            if self.format == "int4":
                out = torch.ops.lckv.int4_linear(flat, self.qweight, self.scale, self.minimum)
            else:
                out = torch.ops.lckv.int8_linear(flat, self.qweight, self.scale, self.block_sums, self.out_features)
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
            return out.view(*x.shape[:-1], self.out_features)
        flat = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        if self.format == "int8":
            out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group_size, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.format == "int4" else ""
        kernel = ", kernel=vnni" if self.vnni else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{group}{kernel}"


def fits_int4(shape: torch.Size | tuple[int, int], group_size: int) -> bool:
    """Whether the int4 kernel takes a weight of this shape: whole groups, rows in blocks of 64."""
    rows, columns = shape
    return columns % group_size == 0 and rows % 64 == 0 and columns % 2 == 0


def _quantized(linears: list[nn.Linear], fmt: str, group_size: int, vnni: bool) -> QuantizedLinear:
    """One quantized product for Linear layers that read the same input (their rows stacked)."""
    weight = torch.cat([layer.weight.detach() for layer in linears])
    biases = [layer.bias for layer in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else weight.new_zeros(layer.out_features) for b, layer in zip(biases, linears)])
    vnni_int4 = vnni and int4_kernel.fits(weight.shape, group_size)
    if fmt == "int4" and not vnni_int4 and not fits_int4(weight.shape, group_size):
        fmt = "int8"  # a shape no int4 kernel takes (tiny test models): 8 bits instead
    return QuantizedLinear(weight, bias, fmt, group_size, vnni)


_LOCK = threading.Lock()  # sessions on several threads may ask for the fast path at once


@torch.no_grad()
def quantize_model(model, settings: QuantizationSettings = QuantizationSettings()) -> QuantizationSettings:
    """Quantize `model` (an LCKVLlamaForCausalLM on the CPU) in place, once; returns the settings in
    force. A second call does nothing and returns the first call's settings, whatever it is given.

    Producer layers get one q/k/v product, every MLP one gate/up product; the float weights of the
    replaced layers are freed. The output head gets its own quantized copy (the input embedding keeps
    its table).
    """
    with _LOCK:
        done = getattr(model, "quantization", None)
        if done is not None:
            return done
        fmt, group, vnni = settings.weights, settings.group_size, settings.vnni
        attention_fmt = settings.attention_format
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            if attention.computes_kv:
                attention.qkv_proj = _quantized([attention.q_proj, attention.k_proj, attention.v_proj],
                                                attention_fmt, group, vnni)
                del attention.q_proj, attention.k_proj, attention.v_proj
            else:
                attention.q_proj = _quantized([attention.q_proj], attention_fmt, group, vnni)
            attention.qkv_weight = None
            attention.o_proj = _quantized([attention.o_proj], attention_fmt, group, vnni)
            mlp.gate_up_proj = _quantized([mlp.gate_proj, mlp.up_proj], fmt, group, vnni)
            del mlp.gate_proj, mlp.up_proj
            mlp.gate_up_weight = None
            mlp.down_proj = _quantized([mlp.down_proj], fmt, group, vnni)
        head = model.lm_head
        model.lm_head = _quantized([head], settings.head, group, vnni)
        model.quantization = settings
        return settings


@torch.no_grad()
def quantized_copy(model, settings: QuantizationSettings = QuantizationSettings(), dtype: torch.dtype | None = None):
    """A copy of `model` for inference with its products quantized (`quantize_model`), `model` left
    as it is. In `dtype` (default: the model's), what stays unquantized (embeddings, norms) is
    converted; in the model's own dtype it is shared with `model`, not copied."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    for module in model.modules():  # tensors held as plain attributes (fused weights)
        shared.update({id(v): v for v in vars(module).values() if isinstance(v, torch.Tensor)})
    fast = copy.deepcopy(model, memo=shared)
    quantize_model(fast, settings)
    if dtype is not None and dtype != model.dtype:
        for module in fast.modules():  # new parameters: `.to(dtype)` would convert the shared ones in place
            for name, param in list(module._parameters.items()):
                if param is not None and param.is_floating_point():
                    module._parameters[name] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
    return fast.eval()
