"""SAFE's checkpoint state: the fields of ``SAFE.state_dict()`` (JSON-safe) and ``parse_state``, which checks
every field of a state before ``SAFE.load_state_dict`` changes anything (errors begin with "state: ...")."""
from __future__ import annotations

import copy
import numbers
from typing import Any

import torch

from .config import _is_int

STATE_VERSION = 1
STATE_FIELDS = frozenset({"version", "step", "armed", "units", "history", "frozen", "failed", "sampling", "log"})


def parse_state(state, unit_names: list[str]) -> dict[str, Any]:
    """``state`` (of ``SAFE.state_dict()``) checked against a SAFE with units ``unit_names`` and
    converted: fresh objects, nothing aliases the caller's dict. Keys: step, armed, history
    {name: [(step, score)]}, frozen {name: step}, failed [name], sampling {device type: uint8
    tensor}, log [entry]."""
    return _StateParser(state, unit_names).parse()


class _StateParser:
    def __init__(self, state, unit_names: list[str]):
        self.state = state
        self.names = list(unit_names)
        self.known = set(unit_names)

    # -- field checks -----------------------------------------------------------------------------
    @staticmethod
    def bad(field, what, got):
        return ValueError(f"state: {field}: expected {what}, got {got!r:.120}")

    def unit(self, field, name):
        if not isinstance(name, str) or name not in self.known:
            raise ValueError(f"state: {field}: unknown adapter unit {name!r:.80}; this SAFE's units are e.g. "
                             f"{self.names[:3]}")
        return name

    def step_of(self, field, t, allow_none=False):
        if t is None and allow_none:
            return None
        if not _is_int(t) or t < 0:
            raise self.bad(field, "an integer step >= 0" + (" or None" if allow_none else ""), t)
        return int(t)

    def score_of(self, field, s):
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            raise self.bad(field, "a number (an importance score)", s)
        return float(s)

    def mapping(self, field):
        v = self.state.get(field, {})
        if not isinstance(v, dict):
            raise self.bad(field, "a mapping unit name -> ...", v)
        return v

    # -- the fields -------------------------------------------------------------------------------
    def parse(self) -> dict[str, Any]:
        state = self.state
        if not isinstance(state, dict):
            raise TypeError(f"state: expected the dict of SAFE.state_dict(), got {type(state).__name__}")
        extra = sorted(map(str, set(state) - STATE_FIELDS))
        if extra:
            raise ValueError(f"state: unknown fields {extra[:5]} (expected those of SAFE.state_dict(): "
                             f"{sorted(STATE_FIELDS)})")
        version = state.get("version", STATE_VERSION)
        if type(version) is not int or version != STATE_VERSION:
            raise ValueError(f"state: version: expected {STATE_VERSION}, got {version!r} (written by another "
                             "peftops?)")
        out: dict[str, Any] = {"step": self.step_of("step", state.get("step"), allow_none=True)}
        armed = state.get("armed", True)
        if not isinstance(armed, bool):
            raise self.bad("armed", "True or False", armed)
        out["armed"] = armed
        self.check_units()
        out["history"] = self.history()
        out["frozen"] = {self.unit("frozen", name): self.step_of(f"frozen[{name!r}]", t)
                         for name, t in self.mapping("frozen").items()}
        failed = state.get("failed", [])
        if not isinstance(failed, (list, tuple)):
            raise self.bad("failed", "a list of adapter unit names", failed)
        out["failed"] = [self.unit("failed", n) for n in failed]
        out["sampling"] = self.sampling()
        out["log"] = self.log()
        return out

    def check_units(self) -> None:
        units = self.state.get("units")
        if units is None:
            return
        if not isinstance(units, list) or not all(isinstance(n, str) for n in units):
            raise self.bad("units", "a list of adapter unit names", units)
        missing, unexpected = sorted(self.known - set(units)), sorted(set(units) - self.known)
        if missing or unexpected:
            raise ValueError(f"state: units: the state's adapter units are not this SAFE's (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}): a checkpoint of another model or adapter config?")

    def history(self) -> dict[str, list[tuple[int, float]]]:
        history = {}
        for name, hist in self.mapping("history").items():
            self.unit("history", name)
            if not isinstance(hist, (list, tuple)):
                raise self.bad(f"history[{name!r}]", "a list of [step, score] pairs", hist)
            pairs = []
            for i, pair in enumerate(hist):
                where = f"history[{name!r}][{i}]"
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise self.bad(where, "a [step, score] pair", pair)
                pairs.append((self.step_of(where, pair[0]), self.score_of(where, pair[1])))
            history[name] = pairs
        return history

    def sampling(self) -> dict[str, torch.Tensor]:
        sampling = self.state.get("sampling", {})
        if not isinstance(sampling, dict):
            raise self.bad("sampling", "a mapping device type -> generator state (hex)", sampling)
        out = {}
        for dev_type, hexstate in sampling.items():
            try:
                raw = torch.tensor(list(bytes.fromhex(hexstate)), dtype=torch.uint8)
                try:
                    probe = torch.Generator(device=dev_type)
                except (RuntimeError, TypeError, ValueError):  # a device type this process lacks: kept, unused
                    probe = None
                if probe is not None:
                    probe.set_state(raw)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"state: sampling[{dev_type!r:.40}]: not a torch.Generator state ({e})") from None
            out[dev_type] = raw
        return out

    def log(self) -> list[dict[str, Any]]:
        log = self.state.get("log", [])
        if not isinstance(log, (list, tuple)):
            raise self.bad("log", "a list of step entries", log)
        return [self.log_entry(f"log[{i}]", e) for i, e in enumerate(log)]

    def log_entry(self, where: str, e) -> dict[str, Any]:
        if not isinstance(e, dict):
            raise self.bad(where, "a dict (one step's entry)", e)
        self.step_of(f"{where}['step']", e.get("step"))
        self.score_of(f"{where}['threshold']", e.get("threshold"))
        if not isinstance(e.get("measuring"), bool):
            raise self.bad(f"{where}['measuring']", "True or False", e.get("measuring"))
        newly = e.get("newly_frozen")
        if not isinstance(newly, list):
            raise self.bad(f"{where}['newly_frozen']", "a list of adapter unit names", newly)
        for n in newly:
            self.unit(f"{where}['newly_frozen']", n)
        scores = e.get("scores", {})
        if not isinstance(scores, dict):
            raise self.bad(f"{where}['scores']", "a mapping unit name -> score", scores)
        for n, sc in scores.items():
            self.unit(f"{where}['scores']", n)
            self.score_of(f"{where}['scores'][{n!r}]", sc)
        return copy.deepcopy(e)
