"""SIFT kernel benchmarks (docs/design.md#sift, #performance-yardsticks): top-k selection, the sparse
weight gradient (SDDMM), the merged-weight write and the fused sparse AdamW step, each against what a
user writes today.

GPU targets (H100): top-k of |grad| 4096x4096 fp32 at 1% >= 3x torch.topk(grad.abs().flatten(), k);
SDDMM T = 4096 and 16384, 4096x4096 bf16 at 1% >= 1.5x (dY^T X).flatten()[idx].
``sift.sddmm.{auto,sparse,dense}``: T in {4096, 16384} x density {0.5, 1, 2, 5}% with the method forced,
against the same dense baseline, so a GPU run measures the dispatch rule (docs/perf-model.md#sddmm).
Every case carries the performance model's estimate of its peftops path (kernels/_perf_model.py).
The whole SIFTLinear training step lives in ``layer_cases(device, quick)`` (added by the layer
module's author); ``cases`` includes it when it is defined here.
"""
from __future__ import annotations

import torch

from peftops.kernels import _perf_model as PM
from peftops.kernels import sift as K

from .harness import Case

D = 4096


def _k(numel: int, density: float) -> int:
    return min(int(density * numel) + 1, numel)  # docs/design.md#sift-selection (the authors' formula)


def _flat_idx(numel: int, k: int, device, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(numel, generator=g)[:k].sort().values.to(device)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


# ----------------------------------------------------------------------------------------------
# top-k selection
# ----------------------------------------------------------------------------------------------
def _topk_case(name, device, shape, density, dtype, sweep):
    numel = shape[0] * shape[1]
    k = _k(numel, density)

    def make():
        g = torch.Generator(device="cpu").manual_seed(0)
        return {"g": torch.randn(shape, generator=g).to(dtype).to(device), "k": k}

    elt = torch.finfo(dtype).bits // 8
    return Case(
        name=name, shape=f"{shape[0]}x{shape[1]} {_name(dtype)} {density:g} (k={k})", make=make,
        reference=lambda x: torch.topk(x["g"].abs().flatten(), x["k"]).indices,
        peftops=lambda x: K.topk_abs_select(x["g"], x["k"]),
        bytes=numel * elt + k * 8, sweep=sweep, model=PM.topk(numel, k, elt),
        note="ours: exact, ties to the lower index, ascending, NaN/Inf check; one host sync",
    )


def _topk_cases(device, quick):
    if quick:
        return [_topk_case("sift.topk", device, (s, s), 0.01, torch.float32, ("numel", s * s)) for s in (64, 128)]
    out = [_topk_case("sift.topk", device, (s, D), 0.01, torch.float32, ("numel", s * D))
           for s in (512, 1024, 2048, 4096, 11008)]
    out += [_topk_case("sift.topk.density", device, (D, D), d, torch.float32, ("density %", 100 * d))
            for d in (0.001, 0.005, 0.01, 0.02, 0.05)]
    out.append(_topk_case("sift.topk.bf16", device, (D, D), 0.01, torch.bfloat16, None))
    return out


# ----------------------------------------------------------------------------------------------
# SDDMM: the sparse weight gradient
# ----------------------------------------------------------------------------------------------
def _sddmm_model(T, d_out, d_in, k, elt, method):
    """The model of the path ``method`` takes ("auto": the one sddmm_prefers_dense picks on an H100)."""
    if method == "auto":
        method = "dense" if PM.sddmm_prefers_dense(T, d_out, d_in, k, elt) else "sparse"
    fn = PM.sddmm_dense if method == "dense" else PM.sddmm_sparse
    return fn(T, d_out, d_in, k, elt)


def _sddmm_case(name, device, T, d_out, d_in, density, dtype, sweep, method=None):
    """``method`` None: the default call (auto); else sddmm_at_indices(..., method=method), which needs
    the method argument (a TypeError when this case runs against a kernels.sift without it)."""
    k = _k(d_out * d_in, density)

    def make():
        g = torch.Generator(device="cpu").manual_seed(1)
        idx = _flat_idx(d_out * d_in, k, device, seed=2)
        x = {"dy": torch.randn(T, d_out, generator=g).to(dtype).to(device),
             "x": torch.randn(T, d_in, generator=g).to(dtype).to(device),
             "idx": idx, "rows": idx // d_in, "cols": idx % d_in}
        ours(x)  # the index plan, cached per index set
        return x

    kw = {} if method is None else {"method": method}

    def ours(x):
        return K.sddmm_at_indices(x["dy"], x["x"], x["rows"], x["cols"], **kw)

    elt = torch.finfo(dtype).bits // 8
    shape = f"T={T} {d_out}x{d_in} {_name(dtype)} {density:g} (k={k})" + (f" method={method}" if method else "")
    return Case(
        name=name, shape=shape, make=make,
        reference=lambda x: (x["dy"].T @ x["x"]).flatten()[x["idx"]],
        peftops=ours, bytes=T * (d_out + d_in) * elt + k * (8 + 4), flops=2 * k * T, sweep=sweep,
        compile_reference=method is None, model=_sddmm_model(T, d_out, d_in, k, elt, method or "auto"),
        note="ours accumulates in fp32 and returns fp32; reference output in the input dtype",
    )


def _sddmm_cases(device, quick):
    methods = ("auto", "sparse", "dense")
    if quick:
        out = [_sddmm_case("sift.sddmm", device, T, 96, 80, 0.05, torch.float32, ("T", T)) for T in (32, 64)]
        return out + [_sddmm_case(f"sift.sddmm.{m}", device, 64, 96, 80, 0.05, torch.float32, None, m)
                      for m in methods]
    out = [_sddmm_case("sift.sddmm", device, T, D, D, 0.01, torch.bfloat16, ("T", T))
           for T in (1024, 2048, 4096, 8192, 16384)]
    out += [_sddmm_case("sift.sddmm.density", device, 4096, D, D, d, torch.bfloat16, ("density %", 100 * d))
            for d in (0.001, 0.005, 0.01, 0.02, 0.05)]
    out += [_sddmm_case(f"sift.sddmm.{m}", device, T, D, D, d, torch.bfloat16, None, m)
            for T in (4096, 16384) for d in (0.005, 0.01, 0.02, 0.05) for m in methods]
    return out


# ----------------------------------------------------------------------------------------------
# merged write and the fused AdamW step
# ----------------------------------------------------------------------------------------------
def _scatter_case(device, shape, density, dtype):
    numel = shape[0] * shape[1]
    k = _k(numel, density)

    def make():
        g = torch.Generator(device="cpu").manual_seed(3)
        w0 = torch.randn(shape, generator=g).to(dtype).to(device)
        idx = _flat_idx(numel, k, device, seed=4)
        return {"w0": w0, "w": w0.clone(), "idx": idx, "w0_sel": w0.view(-1)[idx].float(),
                "delta": (torch.randn(k, generator=g) * 1e-3).to(device)}

    elt = torch.finfo(dtype).bits // 8
    return Case(
        name="sift.scatter", shape=f"{shape[0]}x{shape[1]} {_name(dtype)} {density:g} (k={k})", make=make,
        reference=lambda x: x["w0"].view(-1).index_add(0, x["idx"], x["delta"].to(dtype)).view(shape),
        peftops=lambda x: K.scatter_merged_(x["w"], x["idx"], x["w0_sel"], x["delta"]),
        bytes=k * (8 + 4 + 4 + elt), sweep=("k", k),
        # idx, w0, delta read; each scattered write a 32-byte sector of W
        model=PM.elementwise("sift scatter-merged", k, 8 + 4 + 4 + 32, dependent_loads=1),
        note="reference: W = W0 + scatter(delta), out of place (a dense rewrite)",
    )


def _adamw_case(device, shape, density, dtype):
    numel = shape[0] * shape[1]
    k = _k(numel, density)
    hp = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)

    def make():
        g = torch.Generator(device="cpu").manual_seed(5)
        w = torch.randn(shape, generator=g).to(dtype).to(device)
        idx = _flat_idx(numel, k, device, seed=6)
        grad = (torch.randn(k, generator=g) * 1e-2).to(device)
        param = torch.nn.Parameter(torch.zeros(k, device=device))
        param.grad = grad.clone()
        fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
        opt = torch.optim.AdamW([param], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                                weight_decay=hp["weight_decay"], **fused)
        return {"w": w, "idx": idx, "w0_sel": w.view(-1)[idx].float(), "grad": grad, "param": param, "opt": opt,
                "delta": torch.zeros(k, device=device), "m": torch.zeros(k, device=device),
                "v": torch.zeros(k, device=device), "step": [0]}

    def reference(x):
        x["opt"].step()
        x["w"].view(-1).index_put_((x["idx"],), (x["w0_sel"] + x["param"].detach()).to(dtype))

    def ours(x):
        x["step"][0] += 1
        K.sparse_adamw_step_(x["w"], x["idx"], x["w0_sel"], x["delta"], x["grad"], x["m"], x["v"],
                             step=x["step"][0], **hp)

    elt = torch.finfo(dtype).bits // 8
    return Case(
        name="sift.adamw_step", shape=f"{shape[0]}x{shape[1]} {_name(dtype)} {density:g} (k={k})", make=make,
        reference=reference, peftops=ours,
        # read idx, w0, delta, grad, m, v; write delta, m, v and the weight entries
        bytes=k * (8 + 4 * 4 + 3 * 4 + elt), sweep=("k", k), compile_reference=False,
        # idx, w0, delta, grad, m, v read; delta, m, v written; a 32-byte sector of W per entry
        model=PM.elementwise("sift sparse AdamW step", k, 8 + 5 * 4 + 3 * 4 + 32, 16, dependent_loads=1),
        note="reference: torch.optim.AdamW (fused on CUDA) on the k-vector + index_put_ of W0[I] + delta",
    )


def _update_cases(device, quick):
    if quick:
        return [_scatter_case(device, (64, 48), 0.05, torch.float32),
                _adamw_case(device, (64, 48), 0.05, torch.float32)]
    out = [_scatter_case(device, (D, D), d, torch.bfloat16) for d in (0.001, 0.01, 0.05)]
    out += [_adamw_case(device, (D, D), d, torch.bfloat16) for d in (0.001, 0.01, 0.05)]
    return out


def cases(device, quick):
    device = torch.device(device)
    out = _topk_cases(device, quick) + _sddmm_cases(device, quick) + _update_cases(device, quick)
    layer = globals().get("layer_cases")
    if layer is not None:
        out.extend(layer(device, quick))
    return out


# ----------------------------------------------------------------------------------------------
# Layer level (peftops.sift): one SIFTLinear training step vs the authors' approach
# ----------------------------------------------------------------------------------------------
def layer_cases(device, quick):
    """"sift.train_step": forward + backward + optimizer step of one targeted linear.

    reference: the authors' approach: nn.Linear whose weight gets a dense d_out × d_in gradient,
    gathered at the index set, AdamW on the k-vector δ, then the out-of-place merge
    W = W0 + scatter(I, δ). peftops: SIFTLinear (merged weight, SDDMM for dδ, never a dense ∇W) +
    SparseAdamW (one fused kernel for m, v, δ and W[I] = round(W0[I] + δ)). x requires grad in both
    (a layer inside a network), so dx is computed in both. Peak memory should differ by at least
    one d_out × d_in buffer."""
    import torch.nn.functional as F

    from peftops.sift import SIFTLinear, SparseAdamW, sift_select

    device = torch.device(device)
    if quick:
        d, dtype, density, token_sweep = 256, torch.float32, 0.01, [64]
    else:
        d, dtype, density, token_sweep = 4096, torch.bfloat16, 0.01, [1024, 4096, 16384]
    es = torch.empty((), dtype=dtype).element_size()

    def make_for(tokens):
        def make():
            g = torch.Generator(device="cpu").manual_seed(0)
            w0 = (torch.randn(d, d, generator=g) * 0.02).to(device, dtype)
            idx = sift_select(torch.randn(d, d, generator=g).to(device), density)
            x = torch.randn(tokens, d, generator=g).to(device, dtype).requires_grad_()
            dy = torch.randn(tokens, d, generator=g).to(device, dtype)
            # reference state: a trainable dense weight, δ and its AdamW
            ref_w = torch.nn.Parameter(w0.clone())
            ref_delta = torch.nn.Parameter(torch.zeros(idx.numel(), device=device))
            ref_opt = torch.optim.AdamW([ref_delta], lr=1e-4, weight_decay=0.0)
            # peftops state
            lin = torch.nn.Linear(d, d, bias=False, device=device, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(w0)
            layer = SIFTLinear.from_linear(lin, idx)
            opt = SparseAdamW([layer.delta], lr=1e-4, weight_decay=0.0)
            return dict(w0=w0, idx=idx, x=x, dy=dy, ref_w=ref_w, ref_delta=ref_delta, ref_opt=ref_opt,
                        layer=layer, opt=opt)
        return make

    def reference(s):
        w, x = s["ref_w"], s["x"]
        x.grad = None
        F.linear(x, w).backward(s["dy"])                   # dense d_out × d_in weight gradient
        s["ref_delta"].grad = w.grad.view(-1)[s["idx"]].float()
        w.grad = None
        s["ref_opt"].step()
        with torch.no_grad():                              # out-of-place merge W = W0 + scatter(I, δ)
            sparse = torch.zeros_like(s["w0"]).view(-1).index_put_((s["idx"],), s["ref_delta"].to(w.dtype))
            w.data = s["w0"] + sparse.view_as(s["w0"])
        return x.grad

    def peftops(s):
        x = s["x"]
        x.grad = None
        s["layer"](x).backward(s["dy"])
        s["opt"].step()
        s["opt"].zero_grad(set_to_none=True)
        return x.grad

    cases = []
    for tokens in token_sweep:
        k = _k(d * d, density)
        flops = 4.0 * tokens * d * d + 2.0 * tokens * k       # y and dx GEMMs + the SDDMM
        bytes_ = 2.0 * d * d * es + 4.0 * tokens * d * es + k * (4 * 5 + 8 + es)
        cases.append(Case(
            name="sift.train_step",
            shape=f"T={tokens} {d}x{d} {str(dtype).replace('torch.', '')} k={density:.0%}",
            make=make_for(tokens), reference=reference, peftops=peftops, bytes=bytes_, flops=flops,
            compile_reference=False, sweep=("tokens", tokens), measure_memory=True,
            note="fwd+bwd+AdamW step; reference: dense dW + gather + AdamW(δ) + out-of-place merge",
        ))
    return cases
