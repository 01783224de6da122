"""WeGeFT: weight-generative fine-tuning (docs/design.md#wegeft) as a torch op, a drop-in module and a method.

    y = x Wᵀ + b + s · (x Ψᵀ)(Φ Wᵀ),   W' = W + s (W Φᵀ) Ψ,   s = α / r,   Φ, Ψ ∈ R^{r×d_in}

- ``wegeft_linear(x, weight, bias, phi, psi, scaling)``: the functional op (custom op
  ``peftops::wegeft_linear`` + its backward op, so it runs eagerly and under
  ``torch.compile(fullgraph=True)``). W is frozen; gradients flow to x, Φ, Ψ and the bias.
- ``WeGeFTLinear``: wraps a frozen ``nn.Linear`` (keeps its ``weight``/``bias`` Parameters, so the
  module's state-dict keys do not change); Φ, Ψ may be shared with other layers.
- ``WeGeFTConfig`` / ``WeGeFTMethod``: ``peftops.apply(model, WeGeFTConfig())`` adapts the q, k, v,
  up, down projections with one (Φ, Ψ) per projection type shared across layers (or per layer).

Output layout: y (and dx) are contiguous on every path, like nn.Linear's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import re
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from .kernels import wegeft as K
from .kernels._checks import FLOAT_DTYPES, check_tensor
from .model import (Method, PeftMethodConfig, _help, autocast_operands, disabled_layers, load_checked_state, refuse_adapted_targets,
                    register_method, replace_module, select_targets, transaction, unmerged_for_block)

__all__ = ["wegeft_linear", "WeGeFTLinear", "WeGeFTConfig", "WeGeFTMethod", "LLAMA_TARGETS", "BERT_TARGETS"]

_EMPTY_SHAPE = (0,)


# ==============================================================================================
# Custom ops
# ==============================================================================================
def _seed_int(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed.reshape(-1)[0])


def _y_like(x2: Tensor, weight: Tensor) -> Tensor:
    """y of the op: a contiguous [T, d_out] on every path (nn.Linear's layout)."""
    return x2.new_empty((x2.shape[0], weight.shape[0]))


@torch.library.custom_op("peftops::wegeft_linear", mutates_args=())
def _wegeft_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], phi: Tensor, psi: Tensor,
    scaling: float, dropout_p: float, seed: Optional[Tensor], path: str,
) -> tuple[Tensor, Tensor]:
    """(y, u = x Ψᵀ) for x [T, d_in]; u is kept for the backward (dΦ needs uᵀ dy)."""
    return K.wegeft_forward(x, weight, bias, phi, psi, scaling, dropout_p=dropout_p, seed=_seed_int(seed), path=path)


@_wegeft_linear_op.register_fake
def _(x, weight, bias, phi, psi, scaling, dropout_p, seed, path):
    return _y_like(x, weight), x.new_empty((x.shape[0], phi.shape[0]))


@torch.library.custom_op("peftops::wegeft_linear_backward", mutates_args=())
def _wegeft_linear_backward_op(
    grad: Tensor, x: Optional[Tensor], u: Optional[Tensor], weight: Tensor, phi: Tensor, psi: Tensor,
    scaling: float, dropout_p: float, seed: Optional[Tensor], path: str, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dΦ, dΨ, db); an output that ``needs`` (dx, dΦ, dΨ, db) leaves out is an empty tensor."""
    need_dx, need_dphi, need_dpsi, need_db = needs
    dx, dphi, dpsi, db = K.wegeft_backward(
        grad, x, u, weight, phi, psi, scaling, dropout_p=dropout_p, seed=_seed_int(seed), path=path,
        need_dx=need_dx, need_dphi=need_dphi, need_dpsi=need_dpsi, need_dbias=need_db,
    )
    empty = grad.new_empty(_EMPTY_SHAPE)
    return tuple(t if t is not None else empty.clone() for t in (dx, dphi, dpsi, db))


@_wegeft_linear_backward_op.register_fake
def _(grad, x, u, weight, phi, psi, scaling, dropout_p, seed, path, needs):
    need_dx, need_dphi, need_dpsi, need_db = needs
    t = grad.shape[0]
    d_out, d_in = weight.shape
    empty = grad.new_empty(_EMPTY_SHAPE)
    dx = empty.clone()
    if need_dx:
        dx = grad.new_empty((t, d_in))
    dphi = phi.new_empty(phi.shape) if need_dphi else empty.clone()
    dpsi = psi.new_empty(psi.shape) if need_dpsi else empty.clone()
    db = grad.new_empty((d_out,)) if need_db else empty.clone()
    return dx, dphi, dpsi, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, phi, psi, scaling, dropout_p, seed, path = inputs
    _, u = output
    need_x, _, need_b, need_phi, need_psi = ctx.needs_input_grad[:5]
    # Save only what the needed gradients read: x for dΨ, u for dΦ (W, Φ, Ψ are parameters).
    ctx.save_for_backward(x if need_psi else None, u if need_phi else None, weight, phi, psi, seed)
    ctx.scaling, ctx.dropout_p, ctx.path = scaling, dropout_p, path
    ctx.needs = [bool(need_x), bool(need_phi), bool(need_psi), bool(need_b)]
    ctx.mark_non_differentiable(u)


def _backward(ctx, grad_y, grad_u):
    x, u, weight, phi, psi, seed = ctx.saved_tensors
    if not any(ctx.needs):
        return (None,) * 9
    dx, dphi, dpsi, db = torch.ops.peftops.wegeft_linear_backward(
        grad_y, x, u, weight, phi, psi, ctx.scaling, ctx.dropout_p, seed, ctx.path, ctx.needs
    )
    need_dx, need_dphi, need_dpsi, need_db = ctx.needs
    return (dx if need_dx else None, None, db if need_db else None, dphi if need_dphi else None,
            dpsi if need_dpsi else None, None, None, None, None)


torch.library.register_autograd("peftops::wegeft_linear", _backward, setup_context=_setup_context)


# ==============================================================================================
# Functional API
# ==============================================================================================
def _new_seed() -> Tensor:
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)


def _check_seed(seed) -> None:
    """None, an int, or an integer tensor with one element."""
    if seed is None:
        return
    if isinstance(seed, Tensor):
        if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"dropout_seed: expected an integer tensor, got dtype {seed.dtype}")
        if seed.numel() != 1:
            raise ValueError(f"dropout_seed: expected one element, got shape {list(seed.shape)}")
    elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"dropout_seed: expected None, an int or a one-element integer tensor, "
                        f"got {type(seed).__name__} {seed!r}")


def wegeft_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], phi: Tensor, psi: Tensor, scaling: float, *,
    dropout_p: float = 0.0, dropout_seed: Optional[int | Tensor] = None, path: str = "auto",
) -> Tensor:
    """y = x Wᵀ + b + scaling · (x Ψᵀ)(Φ Wᵀ) for x [..., d_in], W [d_out, d_in], Φ, Ψ [r, d_in].

    All tensors share one float dtype and device. W must not require grad (it is frozen).
    ``dropout_p`` > 0: the generated branch uses W∘M/(1-p) with a fresh keep-mask M over W's entries
    per call (``dropout_seed`` fixes it: an int or a CPU tensor; a CUDA tensor is copied to the host, one
    sync per call); the x Wᵀ term never sees dropout. ``path``: "auto" (by token
    count), "fused" or "merged" (kernels/wegeft.py). Returns [..., d_out].
    """
    K.check_linear_inputs(x, weight, bias, phi, psi, scaling, dropout_p, path)
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight: WeGeFT keeps the base weight frozen; call weight.requires_grad_(False)")
    _check_seed(dropout_seed)
    d_out, d_in = weight.shape
    lead = x.shape[:-1]
    seed = None
    if dropout_p > 0:
        if dropout_seed is None:
            seed = _new_seed()
        elif isinstance(dropout_seed, Tensor):
            seed = dropout_seed.reshape(1).to(device="cpu", dtype=torch.int64)
        else:
            seed = torch.tensor([int(dropout_seed) & 0x7FFFFFFF], dtype=torch.int64)
    # math.prod, not -1: with d_in = 0 a [*, 0] reshape cannot infer the token count
    y, _ = torch.ops.peftops.wegeft_linear(x.reshape(math.prod(lead), d_in), weight, bias, phi, psi, float(scaling),
                                           float(dropout_p), seed, path)
    return y.reshape(*lead, d_out)


# ==============================================================================================
# Module
# ==============================================================================================
def _generator_dtype(weight_dtype: torch.dtype, upcast: bool) -> torch.dtype:
    return torch.float32 if upcast and weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def new_generators(shape: tuple[int, int], weight: Tensor, upcast: bool = True, identity: bool = True
                   ) -> tuple[nn.Parameter, nn.Parameter]:
    """(Φ, Ψ) [r, d_in] on W's device, fp32 for 16-bit W when ``upcast``: Φ = 0 (the adapted layer starts
    equal to the base) or, with ``identity=False``, N(0, 0.02²) (tests, ablations); Ψ kaiming-uniform
    as nn.Linear's weight."""
    dtype = _generator_dtype(weight.dtype, upcast)
    phi = nn.Parameter(torch.zeros(shape, dtype=dtype, device=weight.device))
    psi = nn.Parameter(torch.empty(shape, dtype=dtype, device=weight.device))
    with torch.no_grad():
        nn.init.kaiming_uniform_(psi, a=math.sqrt(5))
        if not identity:
            nn.init.normal_(phi, std=0.02)
    return phi, psi


class WeGeFTLinear(nn.Module):
    """A frozen ``nn.Linear`` plus generators: y = x Wᵀ + b + s · (x Ψᵀ)(Φ Wᵀ), s = α / r.

    Keeps the base layer's ``weight`` and ``bias`` Parameters (frozen). ``phi``/``psi``: pass existing
    Parameters [r, in_features] to share them with other layers (their gradients then sum over the
    layers), or leave None to create this layer's own (Φ = 0, Ψ kaiming-uniform, so the output starts
    equal to the base layer's). Generators of fp16/bf16 layers are stored in fp32 when
    ``upcast_generators`` (cast to the weight dtype in forward; their gradients arrive in fp32).

    ``generator_owner``: another WeGeFTLinear whose generators this layer shares (Φ, Ψ default to its
    ``phi``/``psi``). Both layers register the same Parameters (so ``.to()``, DDP, FSDP's
    ``ignored_params``, ``torch.compile`` and deepcopy treat them as usual), but only the owner's
    ``state_dict`` carries them: a sharer leaves ``phi``/``psi`` out, so the model's state dict has no
    aliased tensors and ``save_pretrained`` (safetensors) and Trainer checkpoints work. Loading, a
    sharer needs no entry (one given, e.g. by an aliased ``torch.save`` file, is ignored: the owner's
    is the copy) and keeps sharing the owner's Parameters after ``load_state_dict(assign=True)``.
    ``WeGeFTMethod`` makes the first layer of each target the owner.

    ``dropout``: during training the generated branch sees W∘M/(1-p) (fresh mask per call, the
    authors' semantics: entries of W are dropped in the generated branch only); in eval, or p = 0,
    no dropout code runs. ``merge()`` folds s (W Φᵀ) Ψ into W and keeps a copy of the original W
    (on the CPU with ``merge_backup="cpu"``, else on W's device: the memory of one W either way) so
    ``unmerge()`` restores it bit for bit.
    """

    peftops_adapter = True
    _disabled = False  # peftops.disable_adapters: the base layer inside the block

    def __init__(self, base: nn.Linear, r: int = 64, alpha: float = 128.0, *, phi: Optional[nn.Parameter] = None,
                 psi: Optional[nn.Parameter] = None, dropout: float = 0.0, upcast_generators: bool = True,
                 path: str = "auto", merge_backup: str = "cpu", generator_key: Optional[str] = None,
                 generator_owner: Optional["WeGeFTLinear"] = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        if generator_owner is not None:
            if not isinstance(generator_owner, WeGeFTLinear):
                raise TypeError(f"generator_owner: expected a WeGeFTLinear, got {type(generator_owner).__name__}")
            if generator_owner.generator_owner is not None:
                raise ValueError("generator_owner: expected the layer that owns the generators, got one that shares "
                                 "another layer's (pass that layer's generator_owner)")
            phi = generator_owner.phi if phi is None else phi
            psi = generator_owner.psi if psi is None else psi
            if phi is not generator_owner.phi or psi is not generator_owner.psi:
                raise ValueError("generator_owner: phi/psi must be the owner's own Parameters (a sharer's state dict "
                                 "leaves them out, so anything else would never be saved)")
        _check_hparams(r, alpha, dropout, path, merge_backup)
        if not isinstance(upcast_generators, bool):
            raise TypeError(f"upcast_generators: expected a bool, got {type(upcast_generators).__name__} "
                            f"{upcast_generators!r}")
        if generator_key is not None and not isinstance(generator_key, str):
            raise TypeError(f"generator_key: expected a str or None, got {type(generator_key).__name__}")
        shape = (r, base.in_features)
        for name, g in (("phi", phi), ("psi", psi)):  # before the base weight is frozen
            if g is None:
                continue
            if not isinstance(g, nn.Parameter):
                raise TypeError(f"{name}: expected an nn.Parameter, got {type(g).__name__}")
            check_tensor(name, g, dtypes=FLOAT_DTYPES, device=base.weight.device)
            if tuple(g.shape) != shape:
                raise ValueError(f"{name}: expected shape {list(shape)} (r, in_features of the base layer), "
                                 f"got {list(g.shape)}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if phi is None or psi is None:
            new_phi, new_psi = new_generators(shape, self.weight, upcast_generators)
            phi, psi = phi if phi is not None else new_phi, psi if psi is not None else new_psi
        self.phi, self.psi = phi, psi
        self.r, self.alpha, self.scaling = int(r), float(alpha), float(alpha) / int(r)
        self.dropout, self.path, self.merge_backup = float(dropout), path, merge_backup
        self.generator_key = generator_key
        # a plain attribute, not a submodule: the owner's tensors must not enter this layer's state dict
        self.__dict__["_generator_owner"] = generator_owner
        self.merged = False
        self._original_weight: Optional[Tensor] = None

    @property
    def generator_owner(self) -> Optional["WeGeFTLinear"]:
        """The layer whose state dict carries this layer's (shared) generators; None: this one's does."""
        return self.__dict__.get("_generator_owner")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.generator_owner is not None:  # the owner's entries are the one copy
            destination.pop(prefix + "phi", None)
            destination.pop(prefix + "psi", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        owner = self.generator_owner
        if owner is None:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            return
        # state_dict is this module's own copy (torch's contract): drop the sharer's entries, if any
        for name in ("phi", "psi"):
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for name in ("phi", "psi"):
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
            # load_state_dict(assign=True) gave the owner (loaded first: it comes first) new Parameters
            if self._parameters[name] is not owner._parameters[name]:
                self._parameters[name] = owner._parameters[name]

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable tensors of this unit (the shared ones when generators are shared)."""
        return [self.phi, self.psi]

    def _generators(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.phi.to(dtype), self.psi.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        x, weight, bias = autocast_operands(x, weight, bias)
        if self.merged or self._disabled:  # wegeft_linear's checks on x, so every state fails alike
            check_tensor("x", x, dtypes=FLOAT_DTYPES, device=weight.device)
            if x.dim() < 1 or x.shape[-1] != self.in_features:
                raise ValueError(f"x: last dim of shape {list(x.shape)} does not match weight in_features "
                                 f"{self.in_features}")
            if x.dtype != weight.dtype:
                raise TypeError(f"x: dtype {x.dtype} does not match weight dtype {weight.dtype}")
            return nn.functional.linear(x, weight, bias)
        phi, psi = self._generators(weight.dtype)
        p = self.dropout if self.training else 0.0
        return wegeft_linear(x, weight, bias, phi, psi, self.scaling, dropout_p=p, path=self.path)

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """s (W Φᵀ) Ψ in fp32 (fp64 for fp64 weights): what ``merge`` adds to W."""
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        w = self.weight.to(acc)
        return (w @ self.phi.to(acc).t()) @ self.psi.to(acc) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + s (W Φᵀ) Ψ in place (one Triton sweep on the GPU); no-op when merged."""
        if self.merged:
            return
        w = self.weight
        self._original_weight = w.detach().to("cpu" if self.merge_backup == "cpu" else w.device, copy=True)
        phi, psi = self._generators(w.dtype)
        K.wegeft_merge(w.detach(), phi.detach(), psi.detach(), self.scaling, out=w.detach())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original W bit for bit; no-op when not merged."""
        if not self.merged:
            return
        self.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha:g}, dropout={self.dropout:g}, key={self.generator_key!r}, "
                f"merged={self.merged}")


def _check_hparams(r, alpha, dropout, path, merge_backup):
    # ValueError throughout, as AdapterConfig.validate promises (bool is an int subclass: refused)
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"r: expected an integer >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha: expected a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    if path not in K.PATHS:
        raise ValueError(f"path: expected one of {K.PATHS}, got {path!r}")
    if merge_backup not in ("cpu", "device"):
        raise ValueError(f"merge_backup: expected 'cpu' or 'device', got {merge_backup!r}")


# ==============================================================================================
# Model-level method
# ==============================================================================================
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "intermediate.dense", "output.dense"]
BERT_EXCLUDE = ["attention.output.dense"]  # "output.dense" is the FFN down projection, not attention's


@dataclasses.dataclass
class WeGeFTConfig(PeftMethodConfig):
    """WeGeFT settings (defaults: the authors' LLM scripts), for ``peftops.apply`` and for
    ``peft.get_peft_model``. Target fields (``target_modules``, ``exclude_modules``,
    ``layers_to_transform``, ...) follow PEFT's rules (``PeftMethodConfig``); None infers q, k, v, up,
    down for Llama-style (q_proj ... down_proj) and BERT-style (query, key, value,
    intermediate.dense, output.dense) models."""

    method: ClassVar[str] = "wegeft"
    r: int = _help("Rank of the generators Φ, Ψ [r, in_features].", 64)
    alpha: float = _help("Scale numerator: the generated update is (alpha / r)·(W Φᵀ) Ψ.", 128.0)
    share_generators: bool = _help(
        "One (Φ, Ψ) per projection type shared by all its layers (their in_features must agree); False: one per "
        "layer.", True)
    dropout: float = _help("Dropout on W's entries in the generated branch during training, in [0, 1).", 0.0)
    upcast_generators: bool = _help("Keep the generators of fp16/bf16 layers in fp32.", True)
    path: str = _help("Kernel path: 'auto' (by token count), 'fused' or 'merged' (kernels/wegeft.py).", "auto")
    merge_backup: str = _help("Where merge() keeps the original W for a bit-exact unmerge: 'cpu' or 'device'.",
                              "cpu")

    def validate(self) -> None:
        super().validate()
        _check_hparams(self.r, self.alpha, self.dropout, self.path, self.merge_backup)
        for name in ("share_generators", "upcast_generators"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")


def _suffix_match(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _resolve_targets(model: nn.Module, config: WeGeFTConfig) -> None:
    if config.target_modules is not None:
        return
    # layers another method already adapted count too (apply then names the conflict)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or getattr(type(m), "peftops_adapter", False)
             or isinstance(getattr(m, "base_layer", None), nn.Linear)]  # PEFT tuner layers (add_adapter)
    if any(_suffix_match(n, "q_proj") for n in names):
        config.target_modules = list(LLAMA_TARGETS)
    elif any(_suffix_match(n, "query") for n in names):
        config.target_modules = list(BERT_TARGETS)
        excl = config.exclude_modules
        if isinstance(excl, str):  # a regex: extend it
            config.exclude_modules = rf"(?:{excl})|.*\.{re.escape(BERT_EXCLUDE[0])}"
        else:
            config.exclude_modules = sorted(set(excl or []) | set(BERT_EXCLUDE))
    else:
        raise ValueError(f"target_modules: cannot infer the q/k/v/up/down projections of {type(model).__name__} "
                         "(no Linear named *q_proj or *query); pass target_modules")


def generator_key(name: str, targets) -> str:
    """Which shared (Φ, Ψ) the module ``name`` uses: the most specific matching entry of a target list,
    else (regex / 'all-linear' targets) the name with its layer numbers replaced by '*'."""
    if isinstance(targets, (list, tuple, set)):
        hits = [t for t in targets if _suffix_match(name, t)]
        if hits:
            return max(hits, key=len)
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _targets(model: nn.Module, config: WeGeFTConfig) -> list[tuple[str, nn.Module, str]]:
    """(name, module, generator key) of every module to adapt."""
    return [(name, mod, generator_key(name, config.target_modules)) for name, mod in select_targets(model, config)]


def _adapted(model: nn.Module) -> list[tuple[str, WeGeFTLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WeGeFTLinear)]


def _unit_key(name: str, mod: WeGeFTLinear, config: WeGeFTConfig) -> str:
    return mod.generator_key if config.share_generators else name


@register_method
class WeGeFTMethod(Method):
    """apply / save / load / merge for WeGeFT; the adapter file holds only the generators
    (``<target>.phi/psi`` when shared, ``<module name>.phi/psi`` per layer)."""

    name = "wegeft"
    config_class = WeGeFTConfig

    def apply(self, model: nn.Module, config: WeGeFTConfig) -> None:
        _resolve_targets(model, config)
        refuse_adapted_targets(model, config, "WeGeFT")
        found = _targets(model, config)
        if not found:
            raise ValueError(f"target_modules: no nn.Linear in {type(model).__name__} matches {config.target_modules}"
                             f" (excluding {config.exclude_modules})")
        shared: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        if config.share_generators:
            groups: dict[str, list[tuple[str, nn.Linear]]] = {}
            for name, mod, key in found:
                groups.setdefault(key, []).append((name, mod))
            for key, members in groups.items():
                d_ins = sorted({m.in_features for _, m in members})
                if len(d_ins) > 1:
                    detail = ", ".join(f"{n} (in_features={m.in_features})" for n, m in members[:4])
                    raise ValueError(f"target_modules: shared generators of {key!r} need one in_features across its "
                                     f"layers, found {d_ins}: {detail}; use share_generators=False")
                shared[key] = new_generators((config.r, d_ins[0]), members[0][1].weight, config.upcast_generators,
                                             config.init_weights)
        owners: dict[str, WeGeFTLinear] = {}  # per shared target: its first layer, whose state dict holds Φ, Ψ
        for name, mod, key in found:
            phi, psi = shared.get(key) or new_generators((config.r, mod.in_features), mod.weight,
                                                         config.upcast_generators, config.init_weights)
            new = WeGeFTLinear(mod, config.r, config.alpha, phi=phi, psi=psi, dropout=config.dropout,
                               upcast_generators=config.upcast_generators, path=config.path,
                               merge_backup=config.merge_backup, generator_key=key, generator_owner=owners.get(key))
            if key in shared:
                owners.setdefault(key, new)
            replace_module(model, name, new)

    def adapter_state_dict(self, model: nn.Module, config: WeGeFTConfig) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, mod in _adapted(model):
            unit = _unit_key(name, mod, config)
            out[f"{unit}.phi"] = mod.phi
            out[f"{unit}.psi"] = mod.psi
        return out

    def load_adapter_state_dict(self, model: nn.Module, config: WeGeFTConfig, state: dict[str, Tensor]) -> None:
        load_checked_state(self.adapter_state_dict(model, config), state, "WeGeFT generator",
                           "generators are [r, d_in] per target")

    @contextlib.contextmanager
    def disabled(self, model: nn.Module, config: WeGeFTConfig):
        with unmerged_for_block(self, model, config), disabled_layers(m for _, m in _adapted(model)):
            yield

    def is_merged(self, model: nn.Module, config: WeGeFTConfig) -> bool:
        return any(mod.merged for _, mod in _adapted(model))

    def merge(self, model: nn.Module, config: WeGeFTConfig) -> None:
        snap = transaction()
        for _, mod in _adapted(model):
            if not mod.merged:
                mod.merge()
                if snap is not None:  # W comes back bit for bit from the merge backup
                    snap.on_rollback(mod.unmerge)

    def unmerge(self, model: nn.Module, config: WeGeFTConfig) -> None:
        snap = transaction()
        for _, mod in _adapted(model):
            if mod.merged:
                mod.unmerge()
                if snap is not None:  # the merge is deterministic: re-merging gives the same bits
                    snap.on_rollback(mod.merge)
