"""Precision: every update survives in every precision a user can pick, and bfloat16 is used on a
CPU only where that CPU computes it fast."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from model import Linear, ModelConfig, Transformer
from support.cpu_kernels import (KERNELS, FewRowLinear, cpu_bf16_is_fast, cpu_flags, dnnl_packed_works, few_row_layers,
                                 mkl_packed_works, packed_summary, use_few_row_kernels)
from support.optim import AdamW, return_freed_memory

# the same CPU, restricted to its AVX2 kernels (torch, oneDNN and MKL): what a laptop without
# AVX512-BF16/AMX computes with; bfloat16 matmuls are then ~50-200x slower than float32
AVX2_ONLY = dict(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")


def test_adamw_equals_torch_adamw_in_float32():
    torch.manual_seed(0)
    params = [torch.randn(40, 30), torch.randn(30)]
    ours, ref = [p.clone().requires_grad_() for p in params], [p.clone().requires_grad_() for p in params]
    opt = AdamW([{"params": ours[:1], "weight_decay": 0.1}, {"params": ours[1:], "weight_decay": 0.0}],
                lr=1e-3, betas=(0.9, 0.95))
    opt_ref = torch.optim.AdamW([{"params": ref[:1], "weight_decay": 0.1}, {"params": ref[1:], "weight_decay": 0.0}],
                                lr=1e-3, betas=(0.9, 0.95))
    for step in range(20):
        grads = [torch.randn_like(p) * (step + 1) for p in params]
        for o, r, g in zip(ours, ref, grads):
            o.grad, r.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
    for o, r in zip(ours, ref):
        assert (o - r).abs().max().item() <= 1e-6


def test_bf16_master_copy_keeps_updates_below_half_an_ulp():
    """lr 1e-5 on weights of magnitude ~1: each update is ~1/400 of a bfloat16 ulp. A bare bf16
    weight never moves; ours tracks the float32 weight (its master copy) within rounding."""
    torch.manual_seed(0)
    w32 = (torch.rand(2000) + 0.5).bfloat16().float().requires_grad_()  # the same start for all three
    w16 = w32.detach().bfloat16().requires_grad_()
    bare = w32.detach().bfloat16().requires_grad_()
    start = w32.detach().clone()
    opts = [AdamW([w], lr=1e-5) for w in (w32, w16)] + [torch.optim.AdamW([bare], lr=1e-5, weight_decay=0.0)]
    g = torch.randn(2000).sign()  # a steady push: 600 steps move each weight by ~6e-3, above half an ulp
    for _ in range(600):
        for w, opt in zip((w32, w16, bare), opts):
            w.grad = g.to(w.dtype)
            opt.step()
    assert (bare.detach().float() != start).float().mean() < 0.05  # the bug this guards against: ~nothing moved
    master = opts[1].state[w16]["master"]
    assert (master - w32.detach()).abs().max().item() <= 1e-6  # bf16 gradients of +-1 are exact here
    assert torch.equal(w16.detach(), master.bfloat16())  # the weight is the master's rounding
    assert (w16.detach().float() != start).float().mean() > 0.5


def test_bf16_training_moves_weights_like_fp32(train_tiny, tiny_qwen, tmp_path):
    """train.py with bf16 weights, 12 steps at lr 1e-5, against the same steps in float32: the
    layers' weights change where the float32 run's change, in the same direction."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        r = train_tiny(tmp_path / dtype, steps=12, lr=1e-5, warmup=1, save_every=100, dtype=dtype, k_max=4)
        assert r.returncode == 0, r.stderr
        runs[dtype] = load_file(tmp_path / dtype / "model" / "model.safetensors")
    init = load_file(tiny_qwen / "model.safetensors")
    names = [k for k in init if k.startswith("model.layers.") and init[k].dim() == 2]
    master = torch.load(tmp_path / "bfloat16" / "ckpt.pt", weights_only=True)["optimizer"]["state"]

    def delta(weights, start):
        return torch.cat([(weights(k).float() - start(k)).flatten() for k in names])
    d32 = delta(lambda k: runs["float32"][k], lambda k: init[k])
    d16 = delta(lambda k: runs["bfloat16"][k], lambda k: init[k].bfloat16().float())  # the saved bf16 weights
    dmaster = delta(lambda k: master[k.removeprefix("model.")]["master"], lambda k: init[k].bfloat16().float())
    moved = {name: (d != 0).float().mean().item() for name, d in (("fp32", d32), ("bf16", d16), ("master", dmaster))}
    assert moved["fp32"] > 0.95 and moved["master"] > 0.95, moved
    assert moved["bf16"] > 0.6, moved  # the rest moved by less than half a bf16 ulp so far (kept in the master)
    cosine = [torch.nn.functional.cosine_similarity(d32, d, dim=0).item() for d in (d16, dmaster)]
    assert cosine[0] > 0.8 and cosine[1] > 0.95, cosine  # the saved weights carry the rounding


def test_cpu_bf16_check_agrees_with_the_cpu_flags():
    flags = cpu_flags().split()
    assert cpu_bf16_is_fast() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    r = subprocess.run([sys.executable, "-m", "support.cpu_kernels"], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, **AVX2_ONLY))  # prints what it measures
    assert "bfloat16 is fast: False" in r.stdout, r.stderr


def test_avx2_cpu_trains_and_decodes_in_float32(script, train_tiny, tmp_path):
    r = train_tiny(tmp_path / "out", amp=None, steps=1, save_every=1, dtype="bfloat16", env=AVX2_ONLY)  # amp: the measured default
    assert r.returncode == 0, r.stderr
    assert "matmuls in bfloat16 (bfloat16 is slow on this CPU" in r.stdout  # --dtype is an override
    r = train_tiny(tmp_path / "out2", amp=None, steps=1, env=AVX2_ONLY)
    assert r.returncode == 0, r.stderr
    assert "float32 weights, matmuls in float32 (bfloat16 is slow on this CPU, measured)" in r.stdout
    d = script("decode.py", "--init", tmp_path / "out" / "model", "--prompt", "Hi", "--max-new-tokens", "4", "--json",
               env=AVX2_ONLY)
    assert d.returncode == 0, d.stderr
    assert "decoding in float32" in d.stderr
    assert json.loads((tmp_path / "out" / "model" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_every_few_row_kernel_matches_exact_product(kernel, dtype):
    """Each kernel a decode pass can be given, at every row count it can run (padded to a larger one
    or not), is as close to the exact product as F.linear is."""
    if kernel == "mkl-packed" and (dtype != torch.float32 or not mkl_packed_works()):
        pytest.skip("MKL's packed GEMM: float32, and only in torch builds with MKL")
    if kernel == "dnnl-packed" and not dnnl_packed_works(dtype):
        pytest.skip("oneDNN's packed GEMM: only in torch builds with oneDNN")
    torch.manual_seed(0)
    layer = use_few_row_kernels(torch.nn.Sequential(torch.nn.Linear(320, 700, bias=True).to(dtype)), pack=True)[0]
    assert isinstance(layer, FewRowLinear)
    for rows in list(range(1, 33)) + [40]:
        bucket = 1 << (rows - 1).bit_length()
        for run_at in {bucket} if kernel == "mkl-packed" else {rows, bucket}:
            if kernel == "mkl-packed" and run_at not in layer.packed:
                layer.packed = {**layer.packed, run_at: torch.ops.mkl._mkl_reorder_linear_weight(layer.weight, run_at)}
            if kernel == "dnnl-packed" and layer.dnnl is None:
                layer.dnnl = torch.ops.mkldnn._reorder_linear_weight(layer.weight, None)
            layer.plan = {rows: (kernel, run_at)}
            x = torch.randn(1, rows, 320).to(dtype)
            exact = x.double() @ layer.weight.double().T + layer.bias.double()
            with torch.no_grad():
                ours = layer(x)
                ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
            assert ours.shape == ref.shape and ours.dtype == dtype and ours.is_contiguous()
            err, ref_err = (ours.double() - exact).abs().max(), (ref.double() - exact).abs().max()
            # bfloat16: one ulp of the largest output, as a kernel may round its partial sums once more
            tol = max(1e-3, torch.finfo(dtype).eps * exact.abs().max()) if dtype == torch.bfloat16 else 1e-5
            assert err <= 2 * ref_err + tol, (kernel, rows, run_at, err, ref_err)


def test_packed_weights_are_chosen_and_never_stale():
    """use_few_row_kernels(pack=True) plans every row count up to its limit; a weight changed after it
    was packed (training) is multiplied as it is now, not as it was packed."""
    torch.manual_seed(0)
    layer = use_few_row_kernels(torch.nn.Sequential(torch.nn.Linear(256, 512)), max_rows=16, pack=True)[0]
    assert sorted(layer.plan) == list(range(1, 17))
    for rows, (kernel, run_at) in layer.plan.items():
        assert kernel in KERNELS and run_at >= rows
        assert kernel != "mkl-packed" or run_at in layer.packed
        assert kernel != "dnnl-packed" or layer.dnnl is not None
    x = torch.randn(8, 256)
    packs = {"mkl-packed": mkl_packed_works(), "dnnl-packed": dnnl_packed_works(torch.float32)}
    for kernel in [k for k, works in packs.items() if works]:
        with torch.no_grad():
            layer.plan = {8: (kernel, 8)}
            layer.packed = {8: torch.ops.mkl._mkl_reorder_linear_weight(layer.weight, 8)} if kernel == "mkl-packed" else {}
            layer.dnnl = torch.ops.mkldnn._reorder_linear_weight(layer.weight, None) if kernel == "dnnl-packed" else None
            layer.packed_version = layer.weight._version
            layer.weight.mul_(2)
            assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)


def test_the_memory_of_packed_weights_is_said():
    model = use_few_row_kernels(torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024)),
                                max_rows=8)  # no packing
    assert packed_summary(model) == ""
    if not mkl_packed_works() or not dnnl_packed_works(torch.float32):
        pytest.skip("MKL's and oneDNN's packed GEMMs: only in torch builds with both")
    w = model[0].weight
    model[0].packed = {b: torch.ops.mkl._mkl_reorder_linear_weight(w, b) for b in (4, 8)}
    model[1].dnnl = torch.ops.mkldnn._reorder_linear_weight(model[1].weight, None)
    assert packed_summary(model) == ("kernels: packed weights where they are the fastest kernel measured, oneDNN's "
                                     "for 1 of 2 products and MKL's for passes of 4, 8 rows (+12 MiB)")


def test_without_packed_gemms_the_other_kernels_serve(monkeypatch):
    """A torch build without MKL or oneDNN (ARM, macOS) or without their ops: no packed candidate,
    no error."""
    monkeypatch.setattr(torch.ops, "mkl", object())
    monkeypatch.setattr(torch.ops, "mkldnn", object())
    assert not mkl_packed_works() and not dnnl_packed_works(torch.float32)
    layer = use_few_row_kernels(torch.nn.Sequential(torch.nn.Linear(256, 512)), max_rows=8, pack=True)[0]
    assert sorted(layer.plan) == list(range(1, 9)) and not layer.packed and layer.dnnl is None
    assert all(kernel not in ("mkl-packed", "dnnl-packed") for kernel, _ in layer.plan.values())
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)


@pytest.mark.skipif(not cpu_bf16_is_fast(), reason="needs a CPU that computes bfloat16 fast")
def test_amp_auto_times_a_real_step_and_keeps_the_faster(train_tiny, tmp_path):
    r = train_tiny(tmp_path / "out", amp="auto", steps=2, lora=8)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if "a micro-batch of this job took" in x)
    f32, bf16 = (float(x.split(" ms ")[0].split()[-1]) for x in line.split(", "))
    chosen = line.split("matmuls in ")[1].split()[0]
    assert line.endswith("(--amp auto)") and chosen in ("bfloat16", "float32")
    if f32 != bf16:  # the faster one, unless they print alike
        assert chosen == ("bfloat16" if bf16 < f32 else "float32")
    saved = json.loads((tmp_path / "out" / "model" / "train_args.json").read_text())["amp"]
    assert saved == ("bfloat16" if chosen == "bfloat16" else "none")
    r = train_tiny(tmp_path / "out", "--resume", amp="auto", steps=3, lora=8)  # the precision it started in
    assert r.returncode == 0 and "a micro-batch of this job took" not in r.stdout, r.stderr


def test_a_model_off_the_cpu_keeps_its_layers():
    """The few-row kernels are CPU kernels: a model elsewhere (here on the meta device, as one on a GPU)
    keeps its own nn.Linear layers, and nothing is timed or packed for it."""
    with torch.device("meta"):
        model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                                        hidden_dim=48))
    use_few_row_kernels(model, pack=True)
    assert not few_row_layers(model) and type(model.layers[0].mlp.up_proj) is Linear


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only")
def test_freed_memory_goes_back_to_the_system():
    def resident_mib():  # what the kernel counts for this process (/proc/self/statm: pages)
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    tensors = [torch.ones(16_000) for _ in range(8_000)]  # 64 KB each: glibc's heap, not mmap
    keep = tensors[-1]  # the last one keeps the heap's top in use, so free() alone gives nothing back
    del tensors
    held = resident_mib()
    return_freed_memory()
    assert held - resident_mib() > 300, (held, resident_mib())  # of the ~500 MiB freed
    assert keep.sum() == 16_000
