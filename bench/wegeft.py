"""WeGeFT benchmark cases (docs/design.md#wegeft-cost, #performance-yardsticks; GPU targets of the
WeGeFT issue).

Targets and the cases that hold their figures (T = 16384, d = 4096, r = 64, bf16, no bias):
- fwd+bwd within 1.10x of the frozen dense layer's fwd+bwd (dX only):
  ``wegeft.dense_baseline`` (reference = dense layer, peftops = WeGeFT; "speedup" >= 0.91 meets it).
- >= 1.2x faster than the eager formula: ``wegeft.layer_fwd_bwd`` (reference = eager, also compiled).
- not slower than HF peft LoRA at r = 64, and peak memory <= LoRA's: ``wegeft.lora_baseline``
  (reference = peft.tuners.lora.Linear with bf16 adapters, measure_memory=True).
- merge of 4096x4096 within 1.3x of its GEMMs: ``wegeft.merge_vs_gemms`` (reference = cuBLAS
  mm(W, Φᵀ) + addmm(W, ·, Ψ), the minimal GEMM sequence; "speedup" >= 0.77 meets it).
Extra: forward only vs the dense GEMM (docs/design.md#performance-yardsticks), a token sweep, fused
vs merged path at several T (to check ``kernels.wegeft.choose_path``), and B / W' generation for
d_out = 1024 (GQA k/v: the split-K generate, ``kernels.wegeft.generate_splits``) next to d_out = 4096
(one sweep), d_in = 4096: ``wegeft.generate_b``, ``wegeft.merge_by_d_out``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import Case

R, ALPHA = 64, 128.0


def _layer_inputs(device, t, d_in, d_out, r, dtype):
    def make():
        g = torch.Generator(device="cpu").manual_seed(0)

        def rnd(*shape, s=1.0):
            return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

        return {
            "x": rnd(t, d_in).requires_grad_(),
            "w": rnd(d_out, d_in, s=d_in ** -0.5),
            "phi": rnd(r, d_in, s=0.01).requires_grad_(),
            "psi": rnd(r, d_in, s=d_in ** -0.5).requires_grad_(),
            "g": rnd(t, d_out),
            "s": ALPHA / r,
        }

    return make


def _wegeft_fwd_bwd(path="auto"):
    def run(i):
        from peftops.wegeft import wegeft_linear

        y = wegeft_linear(i["x"], i["w"], None, i["phi"], i["psi"], i["s"], path=path)
        return torch.autograd.grad(y, (i["x"], i["phi"], i["psi"]), i["g"])

    return run


def _eager_fwd_bwd(i):
    y = F.linear(i["x"], i["w"]) + i["s"] * (i["x"] @ i["psi"].t()) @ (i["phi"] @ i["w"].t())
    return torch.autograd.grad(y, (i["x"], i["phi"], i["psi"]), i["g"])


def _dense_fwd_bwd(i):
    y = F.linear(i["x"], i["w"])
    return torch.autograd.grad(y, (i["x"],), i["g"])


def _wegeft_fwd(i):
    from peftops.wegeft import wegeft_linear

    with torch.no_grad():
        return wegeft_linear(i["x"], i["w"], None, i["phi"], i["psi"], i["s"])


def _eager_fwd(i):
    with torch.no_grad():
        return F.linear(i["x"], i["w"]) + i["s"] * (i["x"] @ i["psi"].t()) @ (i["phi"] @ i["w"].t())


def _dense_fwd(i):
    with torch.no_grad():
        return F.linear(i["x"], i["w"])


def _lora_inputs(device, t, d_in, d_out, r, dtype):
    base_make = _layer_inputs(device, t, d_in, d_out, r, dtype)

    def make():
        from peft import LoraConfig
        from peft.tuners.lora import Linear as LoraLinear

        i = base_make()
        base = torch.nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            base.weight.copy_(i["w"])
        base.weight.requires_grad_(False)
        lora = LoraLinear(base, "default", config=LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=0.0),
                          r=r, lora_alpha=ALPHA)
        lora.to(device=device, dtype=dtype)  # bf16 adapters (get_peft_model would upcast them to fp32)
        with torch.no_grad():
            lora.lora_B["default"].weight.normal_(0, 0.01)
        i["lora"] = lora
        i["lora_params"] = (lora.lora_A["default"].weight, lora.lora_B["default"].weight)
        return i

    return make


def _lora_fwd_bwd(i):
    y = i["lora"](i["x"])
    return torch.autograd.grad(y, (i["x"], *i["lora_params"]), i["g"])


def _layer_flops(t, d_in, d_out, r):
    fwd = 2 * t * d_in * d_out + 2 * t * r * (d_in + d_out) + 2 * d_out * d_in * r
    bwd = 2 * t * d_in * d_out + 2 * t * r * (2 * d_out + 2 * d_in) + 4 * d_out * d_in * r
    return fwd + bwd


def _layer_bytes(t, d_in, d_out, e):
    # forward reads x, W and writes y; backward reads dy, W, x and writes dx
    return e * (3 * t * d_in + 2 * t * d_out + 2 * d_in * d_out)


def _merge_inputs(device, d, r, dtype, d_out=None):
    """W [d_out, d] (default square), Φ, Ψ [r, d]; ``b_out`` [d_out, r] and ``out`` [d_out, d] buffers."""
    d_out = d if d_out is None else d_out

    def make():
        g = torch.Generator(device="cpu").manual_seed(0)
        w = (torch.randn(d_out, d, generator=g) * d ** -0.5).to(device=device, dtype=dtype)
        phi = (torch.randn(r, d, generator=g) * 0.01).to(device=device, dtype=dtype)
        psi = (torch.randn(r, d, generator=g) * d ** -0.5).to(device=device, dtype=dtype)
        return {"w": w, "phi": phi, "psi": psi, "s": ALPHA / r, "out": torch.empty_like(w),
                "b_out": torch.empty(d_out, r, device=device, dtype=dtype)}

    return make


def _generate_b_peftops(i):
    from peftops.kernels.wegeft import generate_b

    return generate_b(i["w"], i["phi"], i["s"])


def _generate_b_gemm(i):
    return torch.mm(i["w"], i["phi"].t(), out=i["b_out"]).mul_(i["s"])


def _merge_peftops(i):
    from peftops.kernels.wegeft import wegeft_merge

    return wegeft_merge(i["w"], i["phi"], i["psi"], i["s"], out=i["out"])


def _merge_eager(i):
    return i["w"] + i["s"] * (i["w"] @ i["phi"].t()) @ i["psi"]


def _merge_gemms(i):
    return torch.addmm(i["w"], torch.mm(i["w"], i["phi"].t()), i["psi"], alpha=i["s"], out=i["out"])


def cases(device, quick):
    device = torch.device(device)
    if quick:
        dtype, d, r, tokens, t_main = torch.float32, 128, 16, [32, 64], 64
        path_tokens, merge_d, gen_d_outs = [16, 128], 128, [16, 128]
    else:
        dtype, d, r, tokens, t_main = torch.bfloat16, 4096, R, [2048, 4096, 8192, 16384], 16384
        path_tokens, merge_d = [512, 1024, 2048, 4096, 8192], 4096
        gen_d_outs = [1024, 4096]  # a GQA k/v projection (8 of 32 heads) next to q/o: the split-K generate vs one sweep
    e = torch.tensor([], dtype=dtype).element_size()
    shape = f"T={t_main} d={d} r={r} {str(dtype).replace('torch.', '')}"
    out = [
        Case("wegeft.layer_fwd_bwd", shape, _layer_inputs(device, t_main, d, d, r, dtype), _eager_fwd_bwd,
             _wegeft_fwd_bwd(), bytes=_layer_bytes(t_main, d, d, e), flops=_layer_flops(t_main, d, d, r),
             measure_memory=True, note="reference: eager y = x W^T + s (x Psi^T)(Phi W^T), grads x, Phi, Psi"),
        Case("wegeft.dense_baseline", shape, _layer_inputs(device, t_main, d, d, r, dtype), _dense_fwd_bwd,
             _wegeft_fwd_bwd(), bytes=_layer_bytes(t_main, d, d, e), flops=4 * t_main * d * d,
             compile_reference=False, measure_memory=True,
             note="reference: frozen dense layer fwd + dX; target speedup >= 1/1.10 = 0.91"),
        Case("wegeft.lora_baseline", shape, _lora_inputs(device, t_main, d, d, r, dtype), _lora_fwd_bwd,
             _wegeft_fwd_bwd(), bytes=_layer_bytes(t_main, d, d, e), flops=_layer_flops(t_main, d, d, r),
             compile_reference=False, measure_memory=True,
             note="reference: peft LoRA r=64 alpha=128 (bf16 adapters); targets speedup >= 1, peak <= reference"),
        Case("wegeft.layer_fwd", shape, _layer_inputs(device, t_main, d, d, r, dtype), _eager_fwd, _wegeft_fwd,
             bytes=e * (2 * t_main * d + d * d), flops=2 * t_main * d * d,
             note="forward only, reference: eager formula (docs/design.md#performance-yardsticks: est. +27-32%)"),
        Case("wegeft.dense_fwd_baseline", shape, _layer_inputs(device, t_main, d, d, r, dtype), _dense_fwd,
             _wegeft_fwd, bytes=e * (2 * t_main * d + d * d), flops=2 * t_main * d * d, compile_reference=False,
             note="forward only, reference: the dense GEMM"),
    ]
    for t in tokens:
        out.append(Case("wegeft.sweep_fwd_bwd", f"T={t} d={d} r={r}", _layer_inputs(device, t, d, d, r, dtype),
                        _dense_fwd_bwd, _wegeft_fwd_bwd(), bytes=_layer_bytes(t, d, d, e), flops=4 * t * d * d,
                        compile_reference=False, sweep=("tokens", t),
                        note="reference: frozen dense layer fwd + dX (auto path)"))
    for t in path_tokens:
        out.append(Case("wegeft.path_fused_vs_merged", f"T={t} d={d} r={r}", _layer_inputs(device, t, d, d, r, dtype),
                        _wegeft_fwd_bwd("merged"), _wegeft_fwd_bwd("fused"), flops=_layer_flops(t, d, d, r),
                        compile_reference=False, sweep=("tokens", t),
                        note="reference: merged path (cuBLAS on [W'|B]), peftops: fused K-concat Triton GEMM"))
    merge_shape = f"{merge_d}x{merge_d} r={r} {str(dtype).replace('torch.', '')}"
    out += [
        Case("wegeft.merge", merge_shape, _merge_inputs(device, merge_d, r, dtype), _merge_eager, _merge_peftops,
             bytes=2 * merge_d * merge_d * e, flops=4 * merge_d * merge_d * r,
             note="reference: eager W + s (W Phi^T) Psi"),
        Case("wegeft.merge_vs_gemms", merge_shape, _merge_inputs(device, merge_d, r, dtype), _merge_gemms,
             _merge_peftops, bytes=2 * merge_d * merge_d * e, flops=4 * merge_d * merge_d * r, compile_reference=False,
             note="reference: cuBLAS mm(W, Phi^T) + addmm(W, ., Psi); target speedup >= 1/1.3 = 0.77"),
    ]
    dt = str(dtype).replace("torch.", "")
    for d_out in gen_d_outs:  # B = s W Phi^T (fused path, every step) and W' (merged path) by d_out
        gen_shape = f"{d_out}x{merge_d} r={r} {dt}"
        out += [
            Case("wegeft.generate_b", gen_shape, _merge_inputs(device, merge_d, r, dtype, d_out), _generate_b_gemm,
                 _generate_b_peftops, bytes=e * (d_out * merge_d + r * merge_d + d_out * r),
                 flops=2 * d_out * merge_d * r, compile_reference=False, sweep=("d_out", d_out),
                 note="reference: cuBLAS mm(W, Phi^T) * s; peftops: generate_b (split-K below ~SMs/2 row blocks)"),
            Case("wegeft.merge_by_d_out", gen_shape, _merge_inputs(device, merge_d, r, dtype, d_out), _merge_gemms,
                 _merge_peftops, bytes=2 * d_out * merge_d * e, flops=4 * d_out * merge_d * r, compile_reference=False,
                 sweep=("d_out", d_out), note="reference: cuBLAS mm(W, Phi^T) + addmm(W, ., Psi)"),
        ]
    return out
