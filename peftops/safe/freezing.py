"""Freezing: turning adapter units' parameters off for good. ``requires_grad`` goes False, ``.grad`` is
dropped and the optimizers' state of the parameter is released; a parameter shared by several units
(e.g. WeGeFT generators) stops only with its last owner; PEFT re-enabling adapters is undone."""
from __future__ import annotations

import warnings
from typing import Callable

from torch import nn

from .units import AdapterUnit


class Freezer:
    """The adapter units of one SAFE, who owns which parameter, and the optimizers whose state is
    released on freezing. ``before_freeze(params)`` is called with the parameters a freeze would
    stop before anything changes (SAFE's DDP check: it raises to refuse)."""

    def __init__(self, model: nn.Module, units: list[AdapterUnit], optimizer,
                 before_freeze: Callable[[list[nn.Parameter]], None]):
        self.model = model
        self.units = units
        self.by_name = {u.name: u for u in units}
        self.owners: dict[int, list[AdapterUnit]] = {}
        for u in units:
            for p in u.params:
                self.owners.setdefault(id(p), []).append(u)
        self.optimizers: list = []
        for opt in (optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]):
            if opt is not None:
                self.optimizers.append(opt)
        self.before_freeze = before_freeze
        self.warned_all_frozen = False

    def unique_params(self) -> list[nn.Parameter]:
        seen, out = set(), []
        for u in self.units:
            for p in u.params:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def frozen_params(self) -> list[nn.Parameter]:
        """The managed parameters that no longer require grad."""
        return [p for p in self.unique_params() if not p.requires_grad]

    @staticmethod
    def drop_state(optimizer, p) -> None:
        state = getattr(optimizer, "state", None)
        if state is not None and p in state:
            del state[p]

    def release(self, optimizer) -> None:
        """Track ``optimizer`` too and drop its state for every parameter frozen so far."""
        if optimizer not in self.optimizers:
            self.optimizers.append(optimizer)
        for p in self.frozen_params():
            self.drop_state(optimizer, p)

    def turning_off(self, units: list[AdapterUnit]) -> list[nn.Parameter]:
        """The parameters freezing ``units`` would stop (a parameter shared by units stops with the last)."""
        chosen = {id(u) for u in units}
        return [p for u in units for p in u.params if p.requires_grad
                and all(o.frozen or id(o) in chosen for o in self.owners[id(p)])]

    def nothing_would_train(self, units: list[AdapterUnit]) -> bool:
        off = {id(p) for p in self.turning_off(units)}
        return bool(off) and not any(p.requires_grad and id(p) not in off for p in self.model.parameters())

    def keep_something_training(self, units: list[AdapterUnit], allow_freezing_all: bool,
                                score: Callable[[AdapterUnit], float | None], threshold: float) -> list[AdapterUnit]:
        """Unless ``allow_freezing_all``: drop from the schedule's freeze list the most important
        unit when freezing them all would leave the model with no trainable parameter."""
        if allow_freezing_all or not units or not self.nothing_would_train(units):
            return units
        keep = max(units, key=lambda u: score(u) or 0.0)
        if not self.warned_all_frozen:
            self.warned_all_frozen = True
            warnings.warn(f"SAFE: threshold {threshold:.4f} would freeze every adapter unit "
                          f"and leave nothing in the model to train; keeping the most important one, {keep.name!r}, "
                          "training (lower final_threshold, or set SAFEConfig(allow_freezing_all=True) to freeze "
                          "everything)", stacklevel=3)
        return [u for u in units if u is not keep]

    def freeze(self, units: list[AdapterUnit], step) -> None:
        """Mark ``units`` frozen at ``step`` and stop every parameter whose owners are all frozen."""
        turning_off = self.turning_off(units)
        if turning_off:
            self.before_freeze(turning_off)  # before any state changes
        for u in units:
            u.frozen_at = step
        for u in units:
            for p in u.params:
                if all(o.frozen for o in self.owners[id(p)]) and p.requires_grad:
                    p.requires_grad_(False)
                    p.grad = None
                    for opt in self.optimizers:
                        self.drop_state(opt, p)
        if units and all(u.frozen for u in self.units) and not self.warned_all_frozen:
            self.warned_all_frozen = True
            warnings.warn("SAFE: every adapter unit is frozen; unless other parameters train, the loss no longer "
                          "requires grad (lower final_threshold to keep some adapters training)", stacklevel=4)

    def reassert(self) -> None:
        """PEFT's set_adapter / enable_adapters turn requires_grad back on: frozen stays frozen."""
        for u in self.units:
            if u.frozen:
                for p in u.params:
                    if p.requires_grad and all(o.frozen for o in self.owners[id(p)]):
                        p.requires_grad_(False)
                        p.grad = None
