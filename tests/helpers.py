"""Shared test helpers: devices, backends, tolerances, tiny models and batches, NaN poisoning.

Conventions for the tests in this folder (import what you need: ``from helpers import ...``):

- Tiny models: ``tiny_bert(...)`` (a BertForSequenceClassification) and ``tiny_llama(...)`` (a
  LlamaForCausalLM), or ``tiny_model(kind, ...)``: random weights, seeded (``seed=0``), eval mode,
  no download. Keywords give the variations (vocab, hidden, layers, heads, intermediate,
  max_positions, num_labels, dropout, attn, head=<another head class>, dtype, train=True,
  seed=None to leave the RNG alone); ``None`` for a config field means transformers' default and
  extra keywords go to the config. A test whose assertions hang on its model's sizes passes them
  here instead of writing its own config (``WIDE[kind]``: the 32-wide sizes several files share).
  ``tiny_batch(kind, n, seq, vocab=...)`` and ``tiny_ids`` draw matching inputs from a seeded
  generator (``generator=``: several batches from one stream); ``train_steps`` is the plain loop.
- Tolerances: ``TOL[dtype] = (atol, rtol)`` against a float64 reference computed from the same
  rounded inputs; ``assert_close(actual, expected, dtype, scale=...)`` applies them (``scale``
  widens atol for long reductions).
- Poisoning, the one way to catch unwritten elements: ``poisoned(shape, dtype, device)`` is a
  tensor full of NaN (integers: a NaN's bits, a huge value; bool: True) to pass as an ``out=``
  buffer; ``poison_fresh_buffers(monkeypatch)`` makes every ``torch.empty`` / ``torch.empty_like``
  return one for the rest of the test, so buffers a kernel allocates start as NaN too.
- Backends: kernel tests are parametrized with ``device_backend_params()`` (``device, backend``: the
  reference everywhere, triton where it runs, skipped elsewhere) and run under
  ``force_backend(backend)``; model-plumbing files run on the reference kernels through the
  conftest fixture: ``pytestmark = pytest.mark.usefixtures("reference_backend")``.
- Seeds: tests/conftest.py seeds torch, ``random`` and numpy before every test (from the test id),
  so no test depends on what ran before it; a test that needs a particular stream seeds its own
  ``torch.Generator().manual_seed(n)`` (hypothesis tests draw their own seeds).
- Errors: an error about a named argument starts with the name and a colon, and the test matches
  that whole prefix from the start: ``pytest.raises(ValueError, match=r"^density: expected")``.
  Messages without such a prefix (RuntimeError states, third-party errors) match a fragment.
"""
from __future__ import annotations

import pytest
import torch

from peftops.kernels import force_backend, triton_runs_on

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (atol, rtol) against a float64 reference computed from the same (rounded) inputs.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def device_backend_params():
    """(device, backend) pairs every op is tested on: the reference everywhere, triton where it runs."""
    out = []
    for dev in DEVICES:
        out.append(pytest.param(dev, "reference", id=f"{dev}-reference"))
        marks = [] if triton_runs_on(torch.device(dev)) else [pytest.mark.skip(reason=f"triton does not run on {dev} here")]
        out.append(pytest.param(dev, "triton", id=f"{dev}-triton", marks=marks))
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0, msg: str = ""):
    """Compare with the tolerance of ``dtype`` (default: actual's dtype); ``scale`` widens atol for
    reductions whose magnitude grows with the reduced length (pass e.g. sqrt(K))."""
    dtype = dtype or actual.dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol * scale, rtol=rtol, msg=msg or None)


# ----------------------------------------------------------------------------------------------
# NaN poisoning
# ----------------------------------------------------------------------------------------------
_FLOAT_OF_WIDTH = {2: torch.float16, 4: torch.float32, 8: torch.float64}


def _poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with NaN (integers: the bits of the same-width float NaN; bool: True)."""
    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            if t.element_size() in _FLOAT_OF_WIDTH:
                t.view(_FLOAT_OF_WIDTH[t.element_size()]).fill_(float("nan"))
            else:
                t.fill_(torch.iinfo(t.dtype).max)
    return t


def poisoned(shape, dtype, device="cpu"):
    """A fresh tensor full of NaN: any element a kernel fails to write shows up in the comparison.
    Integer dtypes hold a NaN's bits (int64: 0x7FF8000000000000), so an unwritten slot stays huge."""
    return _poison_(torch.empty(shape, dtype=dtype, device=device))


def poison_fresh_buffers(monkeypatch):
    """Until the test ends (or ``monkeypatch.undo()``), every torch.empty / torch.empty_like returns a
    poisoned tensor: the buffers kernels allocate for their outputs and partials start as NaN."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison_(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison_(empty_like(*a, **k)))


# ----------------------------------------------------------------------------------------------
# tiny Hugging Face models and their batches
# ----------------------------------------------------------------------------------------------
def _given(**fields):
    """The config fields that are not None (None: keep transformers' default)."""
    return {k: v for k, v in fields.items() if v is not None}


def _instantiate(cfg, head, seed, dtype, train):
    import transformers

    cls = getattr(transformers, head) if isinstance(head, str) else head
    if seed is not None:
        torch.manual_seed(seed)
    model = cls(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model if train else model.eval()


def tiny_bert(*, vocab=41, hidden=24, layers=2, heads=2, intermediate=29, max_positions=16, num_labels=3,
              dropout=0.0, attn="eager", seed=0, head=None, dtype=None, train=False, **config):
    """A tiny random BERT, by default a BertForSequenceClassification (``head``: another class or
    its name) with 3 labels, dropout 0 and eager attention, built after ``torch.manual_seed(seed)``
    (``seed=None``: not seeded), in eval mode (``train=True``: as constructed). A None field is
    transformers' default (``dropout=None``: 0.1, ``attn=None``: sdpa); ``config`` goes to BertConfig."""
    import transformers

    cfg = transformers.BertConfig(**_given(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=max_positions, num_labels=num_labels,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, attn_implementation=attn), **config)
    return _instantiate(cfg, head or transformers.BertForSequenceClassification, seed, dtype, train)


def tiny_llama(*, vocab=37, hidden=24, layers=2, heads=4, kv_heads=2, intermediate=31, max_positions=16,
               pad_token_id=0, attn="eager", seed=0, head=None, dtype=None, train=False, **config):
    """A tiny random Llama, by default a LlamaForCausalLM (``head``: another class or its name) with
    grouped-query attention (4 heads, 2 KV heads), eager attention and padding id 0 (its embedding
    row starts at zero; ``pad_token_id=None``: no padding id), seeded and in eval mode as
    ``tiny_bert``; ``config`` goes to LlamaConfig."""
    import transformers

    cfg = transformers.LlamaConfig(**_given(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=max_positions,
        pad_token_id=pad_token_id, attn_implementation=attn), **config)
    return _instantiate(cfg, head or transformers.LlamaForCausalLM, seed, dtype, train)


def tiny_model(kind: str, **kw):
    """``tiny_bert(**kw)`` for kind "bert", ``tiny_llama(**kw)`` for "llama"."""
    return {"bert": tiny_bert, "llama": tiny_llama}[kind](**kw)


# The 32-wide variant several files train on: ``tiny_model(kind, **WIDE[kind])``; vocabularies 50 / 64.
WIDE = {"bert": dict(vocab=50, hidden=32, intermediate=37, max_positions=32),
        "llama": dict(vocab=64, hidden=32, intermediate=48, max_positions=32, pad_token_id=None)}


def tiny_ids(vocab, n=2, seq=7, *, low=1, seed=1, generator=None):
    """[n, seq] token ids in [low, vocab) from ``generator`` or a fresh one seeded with ``seed``."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (n, seq), generator=g)


def tiny_batch(kind: str, n=2, seq=7, *, vocab, low=None, pad=None, num_labels=3, seed=1, generator=None,
               device=None) -> dict:
    """A training batch for ``tiny_model(kind)``. "bert": input_ids in [1, vocab) (0 is [PAD]), an
    attention_mask with row r masked from column c on for each ``r: c`` in ``pad``, then class labels
    in [0, num_labels), drawn after the ids. "llama": input_ids in [0, vocab) and a copy as labels.
    ``low`` overrides the lowest id; ``generator`` takes successive batches from one stream."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    ids = tiny_ids(vocab, n, seq, low=(1 if kind == "bert" else 0) if low is None else low, generator=g)
    if kind == "bert":
        mask = torch.ones(n, seq, dtype=torch.long)
        for row, col in (pad or {}).items():
            mask[row, col:] = 0
        out = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, num_labels, (n,), generator=g)}
    else:
        out = {"input_ids": ids, "labels": ids.clone()}
    return out if device is None else {k: v.to(device) for k, v in out.items()}


def train_steps(step, opt, batches):
    """One optimizer step per batch (``step(**batch).loss`` backward, step, zero_grad); the losses, stacked."""
    losses = []
    for batch in batches:
        loss = step(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses)


__all__ = ["DEVICES", "TOL", "device_backend_params", "assert_close", "poisoned", "poison_fresh_buffers",
           "force_backend", "tiny_bert", "tiny_llama", "tiny_model", "WIDE", "tiny_ids", "tiny_batch", "train_steps",
           "load_bench"]


def load_bench():
    """Import the repository's bench/ package (not installed; the repo root stays off sys.path so the
    top-level name `kernels` is never importable from here)."""
    import importlib.util
    import os
    import sys

    if "bench" in sys.modules:
        return sys.modules["bench"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "bench", os.path.join(root, "bench", "__init__.py"), submodule_search_locations=[os.path.join(root, "bench")]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = mod
    spec.loader.exec_module(mod)
    return mod
