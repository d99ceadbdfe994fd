"""The fused decode step (`fused_step.py`): whether it serves a model and cache (any machine), and
its kernels run by Triton's interpreter on a CPU (float16: the interpreter has no bfloat16) against
the eager step on the same tokens, where Triton is installed and there is no GPU (`pip install
triton`); on a GPU, `test_gpu.py` runs the same check on the real kernels."""

import pytest
import torch

from app_support.tiny import tiny_model
from interpreted import needs_interpreter, run_interpreted
from lckv_stream import cla_map, fused_step
from lckv_stream.fusion import fuse_projections


def test_fits_names_what_keeps_the_fused_step_from_serving():
    model = tiny_model(cla_map(4, 2), hidden_size=128, intermediate_size=256)
    cache = model.new_cache(4, 12)
    if not fused_step.AVAILABLE:
        assert fused_step.fits(model, cache) == "Triton is not installed"
        return
    assert "16-bit" in fused_step.fits(model, cache)  # float32
    half = model.to(torch.float16)
    assert "not fused" in fused_step.fits(half, half.new_cache(4, 12))
    fuse_projections(half)
    assert fused_step.fits(half, half.new_cache(4, 12)) is None
    assert "more than 8 rows" in fused_step.fits(half, half.new_cache(4, 12, batch_size=9))
    ring = tiny_model("0_1s_1s_3", sliding_window=7, hidden_size=128, intermediate_size=256).to(torch.float16)
    fuse_projections(ring)
    assert "ring" in fused_step.fits(ring, ring.new_cache(4, 12))
    odd = tiny_model(cla_map(4, 2), hidden_size=96, num_attention_heads=3, num_key_value_heads=1,
                     intermediate_size=256).to(torch.float16)  # head size 32, hidden 96
    fuse_projections(odd)
    assert "multiples of 64" in fused_step.fits(odd, odd.new_cache(4, 12))
    with pytest.raises(ValueError, match="does not serve"):
        fused_step.FusedStep(odd, odd.new_cache(4, 12))


# (layer map, mode, rows' (sink, window)): each map in one of the two modes; 14 steps after a
# 7-token prompt wrap the rings (sink 4 + window 12 and a row of sink 2 + window 8 in one buffer;
# rows with no sinks at all).
# The last case reads each product's inputs in one load (LCKV_FUSED_PRODUCTS=whole).
CASES = [("cla", "persistent", [(4, 12), (2, 8)], "chunks"), ("lckv", "layers", [(4, 12), (2, 8)], "chunks"),
         ("plain", "persistent", [(0, 12), (0, 9)], "chunks"), ("cla", "layers", [(4, 12), (2, 8)], "whole")]


@needs_interpreter
@pytest.mark.parametrize("layer_types, mode, sizes, products", CASES, ids=lambda value: str(value))
def test_interpreted_fused_step_follows_the_eager_step(layer_types, mode, sizes, products):
    run_interpreted("from fused_reference import check_fused_step; "
                    f"check_fused_step({layer_types!r}, {mode!r}, {sizes!r}, steps=14)",
                    env={"LCKV_FUSED_PRODUCTS": products})


@needs_interpreter
def test_fused_kernels_compile_for_a_hopper_gpu():
    """What the interpreter lets through and a GPU's compiler refuses (a variable whose type differs
    between two branches: the first GPU run failed on three): Triton's compiler, LLVM and ptxas
    take every kernel of both modes for sm_90, for rows with and without sinks."""
    run_interpreted(
        "from hopper_compile import compile_fused_step_for_hopper as build\n"
        "assert build('cla', 'persistent', [(4, 12), (2, 8)]) == ['_persistent_step']\n"
        "assert build('plain', 'persistent', [(0, 12)]) == ['_persistent_step']\n"
        "names = build('lckv', 'layers', [(4, 12)])\n"
        "assert set(names) == {'_prologue_kernel', '_qkv_kernel', '_attend_kernel', '_residual_kernel', "
        "'_up_kernel', '_head_kernel'}, names\n", interpret=False)
    run_interpreted("from hopper_compile import compile_fused_step_for_hopper as build\n"
                    "assert build('cla', 'persistent', [(4, 12), (2, 8)]) == ['_persistent_step']\n",
                    interpret=False, env={"LCKV_FUSED_PRODUCTS": "whole"})


def test_the_fused_step_is_chosen_by_lckv_fused_step(monkeypatch):
    monkeypatch.delenv("LCKV_FUSED_STEP", raising=False)
    assert fused_step.fused_step_mode() is None
    for value, mode in (("persistent", "persistent"), ("Layers", "layers"), ("0", None), ("", None)):
        monkeypatch.setenv("LCKV_FUSED_STEP", value)
        assert fused_step.fused_step_mode() == mode
    monkeypatch.setenv("LCKV_FUSED_STEP", "fast")
    with pytest.raises(ValueError, match="LCKV_FUSED_STEP must be"):
        fused_step.fused_step_mode()


@needs_interpreter
def test_the_product_benchmarks_kernels_compute_the_product():
    """bench/fused_products.py times four ways of writing one product; each must compute it (rows
    of other counts, inputs not a power of two) before its time means anything, and the barrier
    kernel must count every program's arrival."""
    run_interpreted(
        "import sys, torch, triton\n"
        "sys.path.insert(0, 'bench')\n"
        "import fused_products as fp\n"
        "torch.manual_seed(0)\n"
        "for rows in (1, 3):\n"
        "    w = (torch.randn(32, 192) / 192 ** 0.5).to(torch.bfloat16)\n"
        "    x = torch.randn(rows, 192)\n"
        "    want = x @ w.float().t()\n"
        "    common = dict(OUTPUTS=32, INPUTS=192, TILE=8, ROWS=triton.next_power_of_2(rows), CHUNK=64)\n"
        "    for kernel, extra in ((fp._chunked, {'UNROLL': 1}), (fp._chunked, {'UNROLL': 3}),\n"
        "                          (fp._whole, {'WIDTH': 256}), (fp._split, {})):\n"
        "        y = torch.zeros(rows, 32)\n"
        "        kernel[(3,)](x, w, y, rows, **common, **extra)\n"
        "        assert ((y - want).abs().max() / want.abs().max()).item() < 1e-5, kernel\n"
        "counter = torch.zeros(1, dtype=torch.int32)\n"
        "fp._barriers[(1,)](counter, 5, POLL_ATOMIC=False)\n"
        "assert counter.item() == 5\n")
