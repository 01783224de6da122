"""SavedTensorMeter: the bytes autograd saves for backward, split into activations and parameters (how
SAFE's memory saving is measured: a frozen lower half keeps no activation)."""
from __future__ import annotations

import torch
from torch import nn


class SavedTensorMeter:
    """Bytes autograd saves for backward inside the ``with`` block (unique storages).

        with SavedTensorMeter(model) as m:
            loss = model(**batch).loss
        m.activation_bytes, m.parameter_bytes, m.total_bytes

    ``parameter_bytes`` are saved tensors that share storage with a parameter or buffer of the
    given modules (weights kept for the input gradient: no extra memory); ``activation_bytes``
    is everything else, i.e. what the forward keeps alive for backward."""

    def __init__(self, *modules: nn.Module):
        self._modules = modules
        self.activation_bytes = 0
        self.parameter_bytes = 0
        self.count = 0
        self._seen: set = set()
        self._param_ptrs: set = set()
        self._ctx = None

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + self.parameter_bytes

    def _pack(self, t: torch.Tensor):
        self.count += 1
        try:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), t.device)
            nbytes = storage.nbytes()
        except Exception:  # tensors without a plain storage (sparse, nested ...)
            key, nbytes = (id(t), t.device), t.numel() * t.element_size()
        if key not in self._seen:
            self._seen.add(key)
            if key in self._param_ptrs:
                self.parameter_bytes += nbytes
            else:
                self.activation_bytes += nbytes
        return t

    @staticmethod
    def _unpack(t):
        return t

    def __enter__(self):
        for m in self._modules:
            for t in list(m.parameters()) + list(m.buffers()):
                self._param_ptrs.add((t.untyped_storage().data_ptr(), t.device))
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self._ctx = None
        return False
