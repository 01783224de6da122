"""Measurement: the forward hooks of a measuring step. A pre-hook on the model reads the attention mask;
per unit, a pre-hook keeps at most ``max_tokens`` random valid tokens of the input X and a post-hook
compares them with the same tokens of the output Y by ``linear_cka`` (0-dim, left on the device);
``collect`` brings every unit's CKA to the host in one sync per device and turns it into the
importance 1 - CKA (micro-batches of one step averaged). Also the token-sampling generators."""
from __future__ import annotations

import inspect
import math
import warnings

import torch
from torch import nn

from ..kernels.cka import linear_cka
from .units import AdapterUnit


@torch.library.custom_op("peftops::safe_linear_cka", mutates_args=())
def _cka_op(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """linear_cka as one opaque op, so a measuring forward traces under torch.compile(fullgraph=True)
    (the kernel dispatch reads Python state that dynamo cannot trace)."""
    return linear_cka(x, y, mask)


@_cka_op.register_fake
def _(x, y, mask):
    return x.new_empty((), dtype=torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32)


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    for a in kwargs.values():
        if isinstance(a, torch.Tensor):
            return a
    return None


def _output_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((o for o in out if isinstance(o, torch.Tensor)), None)
    if isinstance(out, dict):
        return next((o for o in out.values() if isinstance(o, torch.Tensor)), None)
    return None


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation-checkpoint recomputation)."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


def _arg_names(model) -> list[str]:
    try:
        return list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return []


class Measurer:
    """The measuring hooks of one SAFE on ``model`` and what they measured. ``arm(units)`` before a
    measuring step's forward, ``disarm()`` after it, ``collect()`` for the step's importances.
    ``failed``: units whose measurement raised (warned once, never measured again)."""

    def __init__(self, model: nn.Module, config):
        self.model = model
        self.config = config
        self.handles: list = []
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.x_stack: dict[str, list] = {}
        self.batch_mask: torch.Tensor | None = None
        self.batch_mask_flat: torch.Tensor | None = None
        self.rows_cache: dict = {}
        self.generators: dict = {}
        self.rng_pending: dict[str, torch.Tensor] = {}  # device type -> sampling state from load_state_dict
        self.failed: set[str] = set()
        self.forward_arg_names = _arg_names(model)

    @property
    def armed(self) -> bool:
        return bool(self.handles)

    def arm(self, units: list[AdapterUnit]) -> None:
        self.batch_mask, self.rows_cache = None, {}
        self.handles.append(self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        for u in units:
            if u.frozen or u.name in self.failed:
                continue
            self.handles.append(u.module.register_forward_pre_hook(self._make_pre(u), with_kwargs=True))
            self.handles.append(u.module.register_forward_hook(self._make_post(u), with_kwargs=True))

    def disarm(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.x_stack = {}
        self.batch_mask, self.rows_cache = None, {}

    # -- the batch's tokens -----------------------------------------------------------------------
    def _capture_mask(self, module, args, kwargs):
        self.batch_mask, self.rows_cache = None, {}
        am = kwargs.get("attention_mask")
        if am is None and "attention_mask" in self.forward_arg_names:
            i = self.forward_arg_names.index("attention_mask")
            am = args[i] if i < len(args) else None
        if isinstance(am, torch.Tensor) and am.dim() == 2:
            # bool once per forward (not per unit); one object, so it also keys the row cache
            self.batch_mask = am.detach() if am.dtype == torch.bool else am.detach() != 0
            self.batch_mask_flat = self.batch_mask.reshape(-1)

    def _mask_for(self, lead: tuple) -> torch.Tensor | None:
        m = self.batch_mask
        if m is None:
            return None
        if tuple(m.shape) == tuple(lead) or (len(lead) == 1 and m.numel() == lead[0]):
            return self.batch_mask_flat
        return None  # e.g. unpadded (varlen) token layouts: every row is a real token

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self.generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            saved = self.rng_pending.pop(device.type, None)
            if saved is not None and not torch.compiler.is_compiling():  # resumed: continue the stream
                gen.set_state(saved)
            else:
                gen.manual_seed(self.config.seed)
            self.generators[device] = gen
        return gen

    def _rows(self, T: int, mask: torch.Tensor | None, device: torch.device):
        """(row index or None, mask of those rows or None) for a [T, d] representation: at most
        max_tokens random valid rows, drawn once per forward and shared by every unit. No host
        sync: padding rows get keys above every valid one, so top-k keeps valid rows first."""
        key = (T, device, None if mask is None else id(mask))
        hit = self.rows_cache.get(key)
        if hit is not None:
            return hit
        k = self.config.max_tokens
        if k is None or T <= k:
            out = (None, mask)
        else:
            keys = torch.rand(T, generator=self._generator(device), device=device)
            if mask is not None:
                keys = keys.masked_fill(~mask, 2.0)
            idx = keys.topk(k, largest=False, sorted=False).indices
            out = (idx, None if mask is None else mask[idx])
        self.rows_cache[key] = out
        return out

    # -- per-unit hooks ---------------------------------------------------------------------------
    @staticmethod
    def _measuring(module) -> bool:
        # Not under grad-mode checks: reentrant activation checkpointing runs the real forward
        # under no_grad. Its recomputation (inside backward) is skipped: it would measure twice.
        if torch.compiler.is_compiling():  # a compiled graph's recomputation never reruns module hooks
            return module.training
        return module.training and not _in_backward()

    def _make_pre(self, unit: AdapterUnit):
        name = unit.name

        def pre_hook(module, args, kwargs):
            snap = None
            x = _first_tensor(args, kwargs) if self._measuring(module) else None
            if x is not None and x.is_floating_point() and x.dim() >= 2 and math.prod(x.shape[:-1]) >= 2:
                lead = tuple(x.shape[:-1])
                T = math.prod(lead)
                mask = self._mask_for(lead)
                if mask is not None and mask.device != x.device:
                    mask = None
                idx, m = self._rows(T, mask, x.device)
                x2 = x.detach().reshape(T, x.shape[-1])
                # a copy: the module may update its input in place (e.g. AoT's bias add)
                snap = (x2[idx] if idx is not None else x2.clone(), idx, m, lead)
            self.x_stack.setdefault(name, []).append(snap)

        return pre_hook

    def _make_post(self, unit: AdapterUnit):
        name = unit.name

        def post_hook(module, args, kwargs, output):
            stack = self.x_stack.get(name)
            snap = stack.pop() if stack else None
            if snap is None:
                return
            x2, idx, m, lead = snap
            y = _output_tensor(output)
            if y is None or not y.is_floating_point() or tuple(y.shape[:-1]) != lead:
                return
            y2 = y.detach().reshape(-1, y.shape[-1])
            if idx is not None:
                y2 = y2[idx]
            if x2.dtype != y2.dtype:  # autocast: measure both in the narrower dtype (a measurement)
                narrow = x2.dtype if x2.element_size() < y2.element_size() else y2.dtype
                x2, y2 = x2.to(narrow), y2.to(narrow)
            try:
                # 0-dim, stays on the device until the step ends
                cka = _cka_op(x2, y2, m) if torch.compiler.is_compiling() else linear_cka(x2, y2, m)
            except Exception as e:  # never break training over a measurement
                self.failed.add(name)
                warnings.warn(f"SAFE: cannot measure {name} ({type(e).__name__}: {e}); it will not be scored",
                              stacklevel=2)
                return
            self.pending.setdefault(name, []).append(cka)

        return post_hook

    # -- results ----------------------------------------------------------------------------------
    def collect(self) -> dict[str, float]:
        """Each measured unit's importance 1 - CKA (clipped to [0, 1]; the mean over the step's
        micro-batches; NaN if no measurement was defined); clears what was pending."""
        pending, self.pending = self.pending, {}
        if not pending:
            return {}
        flat = [(name, t) for name, ts in pending.items() for t in ts]
        by_device: dict = {}
        for i, (_, t) in enumerate(flat):
            by_device.setdefault(t.device, []).append(i)
        values = [0.0] * len(flat)
        for idxs in by_device.values():  # one sync per device
            for i, v in zip(idxs, torch.stack([flat[i][1].float() for i in idxs]).tolist()):
                values[i] = v
        sums: dict[str, list[float]] = {}
        for (name, _), cka in zip(flat, values):  # importance = 1 - CKA, clipped to [0, 1] (rounding)
            sums.setdefault(name, []).append(min(max(1.0 - cka, 0.0), 1.0) if cka == cka else float("nan"))
        out = {}
        for name, vs in sums.items():
            good = [v for v in vs if v == v]
            out[name] = sum(good) / len(good) if good else float("nan")
        return out

    def sampling_state(self) -> dict[str, str]:
        """The token-sampling generators' states by device type (hex of torch.Generator.get_state())."""
        out = {t: bytes(s.tolist()).hex() for t, s in self.rng_pending.items()}
        for dev, gen in self.generators.items():
            out[dev.type] = bytes(gen.get_state().tolist()).hex()
        return out

    def load_sampling_state(self, states: dict[str, torch.Tensor], devices) -> None:
        """Continue the sampling streams of ``states`` (device type -> generator state); set now on
        ``devices`` (where the hooks will sample), on first use elsewhere."""
        self.generators, self.rng_pending = {}, dict(states)
        for dev in devices:
            saved = self.rng_pending.pop(dev.type, None)
            if saved is not None:
                gen = torch.Generator(device=dev)
                gen.set_state(saved)
                self.generators[dev] = gen
