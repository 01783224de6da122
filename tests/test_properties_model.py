"""Property suite for the model-level API: generated corrupted adapter folders and generated call
orders. For every case either the call succeeds (and the result is right), or it raises a peftops
error whose message starts with the argument it names, and the model is exactly as before.

Runs under the hypothesis profile of tests/conftest.py ("ci": 25 derandomized examples per
property; HYPOTHESIS_PROFILE=thorough for a longer hunt)."""
import json
import os
import re
import shutil

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import peftops  # noqa: E402
from peftops import model as pm  # noqa: E402
from test_all_or_nothing import IDS, adapted, assert_unchanged, fingerprint  # noqa: E402

from helpers import force_backend, tiny_llama  # noqa: E402

from safetensors.torch import load_file, save_file  # noqa: E402

NAMED = re.compile(r"^[A-Za-z_][\w.\[\]'\"-]*: ")
PEFTOPS_ERRORS = (ValueError, TypeError, IndexError, KeyError, FileNotFoundError, NotADirectoryError, FileExistsError)
METHODS = ["sift", "wegeft", "aot"]


pytestmark = pytest.mark.usefixtures("reference_backend")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One trained adapter folder per method (and its logits on the fresh base after loading)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    with force_backend("reference"):
        for m in METHODS:
            model = adapted(tiny_llama, m)
            peftops.save_adapter(model, root / m)
            with torch.no_grad():
                out[m] = (root / m, model(torch.tensor([[1, 2, 3]])).logits)
    return out


def check_error(e: BaseException):
    assert isinstance(e, PEFTOPS_ERRORS), f"not a peftops error: {type(e).__name__}: {e}"
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    assert NAMED.match(str(msg)), f"error does not start with the argument it names: {msg!r}"


# ----------------------------------------------------------------------------------------------
# corrupted adapter folders
# ----------------------------------------------------------------------------------------------
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 10 ** 6), st.floats(allow_nan=True),
                 st.text(max_size=6), st.lists(st.integers(-2, 5), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _json_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_paths(v, prefix + (i,))


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def _drop(obj, path):
    for p in path[:-1]:
        obj = obj[p]
    del obj[path[-1]]


EDITS = st.sampled_from(["json_value", "json_drop", "truncate_json", "truncate_weights", "tensor_dtype",
                         "tensor_shape", "tensor_nan", "tensor_drop", "tensor_extra", "other_method"])


@given(method=st.sampled_from(METHODS), edit=EDITS, pick=st.integers(0, 10 ** 6), junk=JUNK,
       cut=st.floats(0.0, 0.999))
@settings(max_examples=150)
def test_corrupted_adapter_folder(saved, tmp_path_factory, method, edit, pick, junk, cut):
    src, want = saved[method]
    path = tmp_path_factory.mktemp("case") / "a"
    shutil.copytree(src, path)
    cfg, w = os.path.join(path, pm.CONFIG_FILE), os.path.join(path, pm.WEIGHTS_FILE)
    meta = json.load(open(cfg))
    state = load_file(w)
    keys = sorted(state)
    key = keys[pick % len(keys)]
    if edit in ("json_value", "json_drop"):
        paths = [p for p in _json_paths(meta) if p]
        p = paths[pick % len(paths)]
        (_set(meta, p, junk) if edit == "json_value" else _drop(meta, p))
    elif edit == "truncate_json":
        text = json.dumps(meta)
        open(cfg, "w").write(text[: int(cut * len(text))])
    elif edit == "truncate_weights":
        data = open(w, "rb").read()
        open(w, "wb").write(data[: int(cut * len(data))])
    elif edit.startswith("tensor_") or edit == "other_method":
        if edit == "tensor_dtype":
            state[key] = state[key].to(torch.float16 if state[key].dtype != torch.float16 else torch.int32)
        elif edit == "tensor_shape":
            t = state[key].reshape(-1)
            state[key] = torch.cat([t, t[:1]]) if pick % 2 else t[: max(t.numel() - 1, 0)]
        elif edit == "tensor_nan":
            t = state[key].clone()
            if t.is_floating_point() and t.numel():
                t.view(-1)[pick % t.numel()] = float("nan") if pick % 3 else float("-inf")
            state[key] = t
        elif edit == "tensor_drop":
            del state[key]
        elif edit == "tensor_extra":
            state[key + "_x"] = torch.zeros(2)
        else:  # another method's tensors under this method's config
            other = load_file(os.path.join(saved[METHODS[(METHODS.index(method) + 1) % 3]][0], pm.WEIGHTS_FILE))
            state = {f"{method}::" + k.split("::", 1)[1]: v for k, v in other.items()}
        save_file(state, w)
        if pick % 4:  # mostly keep the JSON consistent, so the method's own checks are reached
            meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                               for k, v in state.items()}
    if edit not in ("truncate_json",):
        json.dump(meta, open(cfg, "w"))
    model = tiny_llama()
    before = fingerprint(model)
    try:
        peftops.load_adapter(model, path)
    except Exception as e:  # noqa: BLE001 - every exception is checked
        check_error(e)
        assert_unchanged(model, before)
        return
    # accepted: then it must be a faithful load (edits that do not matter, e.g. peftops_version; a
    # float tensor stored in fp16 loads rounded to fp16, which is what the file holds)
    with torch.no_grad():
        got = model(torch.tensor([[1, 2, 3]])).logits
    tol = 2e-3 if edit == "tensor_dtype" else 1e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------
# call orders
# ----------------------------------------------------------------------------------------------
OPS = ["apply_sift", "apply_wegeft", "apply_aot", "calibrate", "merge", "unmerge", "save", "load", "compile",
       "train_step", "apply_bad"]


def _op(model, op, where):
    from peftops import AoTConfig, SIFTConfig, WeGeFTConfig
    from peftops.sift import sift_calibrate

    if op == "apply_sift":
        peftops.apply(model, SIFTConfig(density=0.05, target_modules=["q_proj", "v_proj"]))
    elif op == "apply_wegeft":
        peftops.apply(model, WeGeFTConfig(r=2, alpha=4.0, target_modules=["o_proj", "down_proj"]))
    elif op == "apply_aot":
        peftops.apply(model, AoTConfig(reparam="kron", rank=2))
    elif op == "apply_bad":
        peftops.apply(model, WeGeFTConfig(r=2, target_modules=["nothing_matches"]))
    elif op == "calibrate":
        sift_calibrate(model, [{"input_ids": torch.tensor([[1, 2, 3, 4]]), "labels": torch.tensor([[1, 2, 3, 4]])}],
                       progress=False)
    elif op == "merge":
        peftops.merge(model)
    elif op == "unmerge":
        peftops.unmerge(model)
    elif op == "save":
        peftops.save_adapter(model, where, overwrite=True)
    elif op == "load":
        peftops.load_adapter(model, where)
    elif op == "compile":
        peftops.compile_aot_tables(model)
    elif op == "train_step":
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model: nothing trains (test op)")
        ids = torch.tensor([[2, 3, 5, 7]])
        model(ids, labels=ids).loss.backward()
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-0.1)
                p.grad = None


@given(ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=7))
@settings(max_examples=80)
def test_call_orders(tmp_path_factory, ops):
    """Any order of model-level calls: each either works or raises a named error and changes
    nothing; a merge keeps the outputs, an unmerge brings them back."""
    model = tiny_llama()
    where = tmp_path_factory.mktemp("orders") / "a"
    for op in ops:
        before = fingerprint(model)
        try:
            _op(model, op, where)
        except Exception as e:  # noqa: BLE001
            if op == "train_step" and ("nothing trains" in str(e) or str(e).startswith("SIFTLinear has no index set")):
                for p in model.parameters():  # the user's loop, not a peftops call: no rollback owed
                    p.grad = None
                continue
            check_error(e)
            assert_unchanged(model, before)
            continue
        if op in ("merge", "unmerge"):
            with torch.no_grad():
                got = model(IDS).logits
                want = before["logits"].view(torch.float32).reshape(got.shape)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
