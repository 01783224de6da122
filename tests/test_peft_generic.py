"""peft's own generic custom-model tests, run against peftops' registered PEFT methods (WeGeFT, SIFT).

peft's ``tests/test_custom_models.py`` holds a matrix of generic tests (save/load, merge, disable, delete,
multiple adapters, dtypes, ...) in ``TestPeftCustomModel`` and ``TestMultipleActiveAdapters``, parametrised
over peft's own ``TEST_CASES``. ``tests/_peft_suite.py`` fetches that file from the sdist of the installed peft
version at test time (cached under ``~/.cache/peftops/peft-tests/<version>``; never copied into this
repository) and this module runs its tests over case lists of our own, in peft's format.

How the tests are re-parametrised, and why this way: for each test method of the two peft classes this module
makes a *copy of the function object* (same code, globals and closure: the body runs exactly as peft wrote it,
against peft's module globals), drops the ``parametrize`` mark that carries peft's cases, keeps every other mark
(the ``dtype`` / ``autocast_adapter_dtype`` / ``low_cpu_mem_usage`` parametrisations, skipif marks), and adds a
``parametrize`` over our cases. The copies go into generated subclasses of peft's classes, so the
``self._test_*`` helpers of ``PeftCommonTester``, ``transformers_class`` and ``prepare_inputs_for_testing`` are
peft's; every other ``test_*`` name of the base class is set to ``None`` in the subclass, so pytest does not
collect peft's own matrix. Calling the methods from hand-written wrappers would lose the extra
parametrisations and fixtures (``tmp_path``) and need one wrapper per signature; copying keeps pytest's view of
each test identical to peft's, and a generic test added in a later peft release is picked up with no change
here. Which tests are generic is read from their parametrisation, not from a list:

* ``"test_name, model_id, config_cls, config_kwargs"`` (TestPeftCustomModel): over ``CASES``;
* ``"test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2"`` (TestMultipleActiveAdapters):
  over ``MULTI_CASES``;
* ``"config_cls"`` alone, where the body reads ``config_cls``: over ``CONFIG_CLASSES``;
* ``"config0"`` (a config instance): over ``CONFIG_INSTANCES``.

Every other test of those classes exercises one of peft's own methods by name (LoRA/DoRA, IA3, GLoRA, PVeRA,
trainable tokens, ...) and takes no config, so it says nothing about peftops and is not collected
(``NOT_GENERIC`` lists them). Where a generic test cannot hold for one of our methods, ``SKIPS`` names it with
the reason; a failure caused by peftops is not skipped.

One LoRA case per class (``CONTROL``) runs through the same machinery: if it fails, the harness is broken (or
peft changed), not peftops.

Backends: the full matrix runs on the PyTorch reference ops (``force_backend("reference")``): these are tests
of the PEFT plumbing (about 1.5 min of test time on 2 CPU cores; ``test_adapter_dtype_autocast``, 12 variants
per case, is a third of it), and the Triton kernels are compared against the references in their own test
files. A slice (``TRITON_CASES``: both layers targeted, one case per method, and the two-adapter cases with
different targets) runs again on the Triton kernels (the interpreter on CPU, about 35 s more), so the path a
GPU takes goes through the same tests. ``PEFTOPS_PEFT_SUITE_BACKEND=triton`` runs the whole matrix on Triton
(several minutes on CPU). The whole file: 1287 tests, 2-3 min wall on 2 shared cores, plus about 15 s to import
peft's test modules (and about 6 s for the one-time download).
"""
from __future__ import annotations

import dis
import functools
import os
import types

import pytest
import torch

import _peft_suite

suite = _peft_suite.load_or_skip()
tcm = suite.custom_models  # peft's tests/test_custom_models.py, imported from the download

import peft  # noqa: E402

import peftops  # noqa: E402
from peftops.kernels import triton_runs_on  # noqa: E402

CASE_ARGS = "test_name, model_id, config_cls, config_kwargs"
MULTI_ARGS = "test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2"

LoraConfig = peft.LoraConfig
WeGeFTConfig = peftops.WeGeFTConfig
SIFTConfig = peftops.SIFTConfig

# --------------------------------------------------------------------------------------------------------------
# Our cases, in peft's formats. Models: peft's MLP (Linear 10->20, ReLU, Dropout, Linear 20->2), MLP_LayerNorm
# (a LayerNorm before each Linear) and MLP2 (10->32->2). The methods adapt nn.Linear only, so peft's Conv /
# Embedding / MHA models are not used. WeGeFT's alpha is given with r: the default alpha (128, the authors'
# value for r=64) would make the scale alpha/r = 64 at r=2, and peft's training tests (SGD, lr 0.01, inputs up
# to 89) diverge to NaN within 3 steps with it; alpha = 2r keeps the authors' scale of 2.
# SIFT's default index selection waits for sift_calibrate (a training forward raises until then), so the
# generic tests use init_indices="random", which picks the index sets when the adapter is created.
# --------------------------------------------------------------------------------------------------------------
CONTROL = [("Control MLP LoRA", "MLP", LoraConfig, {"target_modules": ["lin0", "lin1"]})]
MULTI_CONTROL = [
    ("Control LoRA Different", "lora", LoraConfig,
     {"target_modules": ["lin0"], "init_lora_weights": False},
     {"target_modules": ["lin1"], "init_lora_weights": False}),
]

W = WeGeFTConfig
WEGEFT_CASES = [
    ("Vanilla MLP 1 WeGeFT", "MLP", W, {"target_modules": "lin0", "r": 2, "alpha": 4.0}),
    ("Vanilla MLP 2 WeGeFT", "MLP", W, {"target_modules": ["lin0"], "r": 2, "alpha": 4.0}),
    ("Vanilla MLP 3 WeGeFT", "MLP", W, {"target_modules": ["lin1"], "r": 2, "alpha": 4.0}),
    ("Vanilla MLP 4 WeGeFT", "MLP", W, {"target_modules": ["lin0", "lin1"], "r": 2, "alpha": 4.0}),
    ("Vanilla MLP 5 WeGeFT", "MLP", W,
     {"target_modules": ["lin0"], "r": 2, "alpha": 4.0, "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 WeGeFT", "MLP", W,
     {"target_modules": ["lin0", "lin1"], "r": 4, "alpha": 8.0, "dropout": 0.1}),
    ("Vanilla MLP 7 WeGeFT unshared", "MLP", W,
     {"target_modules": ["lin0", "lin1"], "r": 2, "alpha": 4.0, "share_generators": False}),
    ("Vanilla MLP 8 WeGeFT regex", "MLP", W, {"target_modules": r".*lin\d", "r": 2, "alpha": 4.0}),
    ("Vanilla MLP 9 WeGeFT all-linear", "MLP", W, {"target_modules": "all-linear", "r": 2, "alpha": 4.0}),
    ("Vanilla MLP 10 WeGeFT exclude", "MLP", W,
     {"target_modules": ["lin0", "lin1"], "exclude_modules": ["lin1"], "r": 2, "alpha": 4.0}),
    ("MLP LayerNorm 1 WeGeFT", "MLP_LayerNorm", W, {"target_modules": ["lin0", "lin1"], "r": 2, "alpha": 4.0}),
    ("MLP2 1 WeGeFT", "MLP2", W, {"target_modules": ["lin0", "lin1"], "r": 4, "alpha": 8.0}),
]
_w = {"init_weights": False}
WEGEFT_MULTI = [
    ("WeGeFT Same", "wegeft", W,
     {"target_modules": ["lin0"], "r": 2, "alpha": 4.0, **_w}, {"target_modules": ["lin0"], "r": 2, "alpha": 4.0, **_w}),
    ("WeGeFT Different", "wegeft", W,
     {"target_modules": ["lin0"], "r": 2, "alpha": 4.0, **_w}, {"target_modules": ["lin1"], "r": 2, "alpha": 4.0, **_w}),
    ("WeGeFT Different rank", "wegeft", W,
     {"target_modules": ["lin0", "lin1"], "r": 2, "alpha": 4.0, **_w},
     {"target_modules": ["lin0", "lin1"], "r": 4, "alpha": 8.0, **_w}),
]

S = SIFTConfig
_r = {"init_indices": "random"}
SIFT_CASES = [
    ("Vanilla MLP 1 SIFT", "MLP", S, {"target_modules": "lin0", "density": 0.1, **_r}),
    ("Vanilla MLP 2 SIFT", "MLP", S, {"target_modules": ["lin0"], "density": 0.1, **_r}),
    ("Vanilla MLP 3 SIFT", "MLP", S, {"target_modules": ["lin1"], "density": 0.25, **_r}),
    ("Vanilla MLP 4 SIFT", "MLP", S, {"target_modules": ["lin0", "lin1"], "density": 0.1, **_r}),
    ("Vanilla MLP 5 SIFT", "MLP", S,
     {"target_modules": ["lin0"], "density": 0.1, "modules_to_save": ["lin1"], **_r}),
    ("Vanilla MLP 6 SIFT regex", "MLP", S, {"target_modules": r".*lin\d", "density": 0.1, **_r}),
    ("MLP LayerNorm 1 SIFT", "MLP_LayerNorm", S, {"target_modules": ["lin0", "lin1"], "density": 0.1, **_r}),
    ("MLP2 1 SIFT", "MLP2", S, {"target_modules": ["lin0", "lin1"], "density": 0.05, **_r}),
]
SIFT_MULTI = [
    ("SIFT Same", "sift", S,
     {"target_modules": ["lin0"], "density": 0.1, **_w, **_r}, {"target_modules": ["lin0"], "density": 0.1, **_w, **_r}),
    ("SIFT Different", "sift", S,
     {"target_modules": ["lin0"], "density": 0.1, **_w, **_r},
     {"target_modules": ["lin1"], "density": 0.25, **_w, **_r}),
]

CASES = CONTROL + WEGEFT_CASES + SIFT_CASES
MULTI_CASES = MULTI_CONTROL + WEGEFT_MULTI + SIFT_MULTI
# config_cls tests build ``config_cls(target_modules=[...], [modules_to_save=...])`` with the defaults otherwise
CONFIG_CLASSES = [LoraConfig, WeGeFTConfig, functools.partial(SIFTConfig, init_indices="random")]
CONFIG_INSTANCES = [
    LoraConfig(target_modules=["lin0"], init_lora_weights=False),
    WeGeFTConfig(target_modules=["lin0"], init_weights=False),
    SIFTConfig(target_modules=["lin0"], init_weights=False, init_indices="random"),
]
# the Triton slice: every case/multi test, on these cases only
TRITON_CASES = [c for c in CASES if c[0] in ("Vanilla MLP 4 WeGeFT", "Vanilla MLP 4 SIFT")]
TRITON_MULTI = [c for c in MULTI_CASES if c[0] in ("WeGeFT Different", "SIFT Different")]

# --------------------------------------------------------------------------------------------------------------
# Named skips: {peft test name: {method: reason}}, only for tests that cannot hold for the method by design.
# --------------------------------------------------------------------------------------------------------------
_NO_BIAS = ("{m} trains no biases: its config has peftops' common `bias` field, which accepts only 'none' and "
            "rejects 'all' with a ValueError when the config is built. peft's test builds a config with "
            "bias='all' and skips only on TypeError (a config without a bias field); with 'all' refused there is "
            "no biased adapter whose add_adapter failure could be checked.")
SKIPS: dict[str, dict[str, str]] = {
    "test_adding_multiple_adapters_with_bias_raises": {"WeGeFT": _NO_BIAS.format(m="WeGeFT"),
                                                       "SIFT": _NO_BIAS.format(m="SIFT")},
}


# --------------------------------------------------------------------------------------------------------------
# the machinery
# --------------------------------------------------------------------------------------------------------------
def _method(config_cls) -> str:
    """'WeGeFT' / 'SIFT' / 'LoRA' for a config class, a partial of one, or an instance."""
    cls = getattr(config_cls, "func", config_cls)
    cls = cls if isinstance(cls, type) else type(cls)
    return {"LoraConfig": "LoRA", "WeGeFTConfig": "WeGeFT", "SIFTConfig": "SIFT"}.get(cls.__name__, cls.__name__)


def _copy(fn):
    """The same function without its marks: code, globals (peft's module), defaults and closure shared."""
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__doc__ = fn.__doc__
    return new


def _param_mark(fn, argnames):
    for mark in getattr(fn, "pytestmark", []):
        if mark.name == "parametrize":
            names = mark.args[0]
            names = ",".join(names) if isinstance(names, (list, tuple)) else names
            if names.replace(" ", "") == argnames.replace(" ", ""):
                return mark
    return None


def _reads(fn, name) -> bool:
    """Whether ``fn``'s body uses its argument ``name`` (a test parametrised over config classes that builds
    LoRA whatever it is given says nothing about our methods)."""
    return any(ins.opname.startswith("LOAD_FAST") and name in str(ins.argval) for ins in dis.get_instructions(fn))


def _params(test, rows, cls_index):
    out = []
    for row in rows:
        values = row if isinstance(row, tuple) else (row,)
        method = _method(values[cls_index])
        ident = values[0].replace(" ", "-") if isinstance(row, tuple) else method
        reason = SKIPS.get(test, {}).get(method)
        marks = [pytest.mark.skip(reason=f"{method}: {reason}")] if reason else []
        out.append(pytest.param(*values, marks=marks, id=ident))
    return out


def _rebuild(fn, replaced, argnames, params):
    new = _copy(fn)
    new.pytestmark = [m for m in getattr(fn, "pytestmark", []) if m is not replaced]
    return pytest.mark.parametrize(argnames, params)(new)


def _generate(base, name, backend, families):
    """A subclass of peft's ``base`` whose generic tests run over ``families`` ({argnames: rows}) on
    ``backend``; peft's other tests (and its own case matrix) are hidden."""
    ns, generic, hidden = {}, [], []
    for attr in sorted(vars(base)):
        fn = vars(base)[attr]
        if not (attr.startswith("test_") and callable(fn)):
            continue
        built = None
        for argnames, (rows, cls_index) in families.items():
            mark = _param_mark(fn, argnames)
            if mark is None or (argnames == "config_cls" and not _reads(fn, "config_cls")):
                continue
            if rows:
                built = _rebuild(fn, mark, argnames, _params(attr, rows, cls_index))
            break
        ns[attr] = built  # None hides the base class's test from collection
        (generic if built is not None else hidden).append(attr)

    @pytest.fixture(autouse=True)
    def _peftops_backend(self):
        if backend == "triton" and not triton_runs_on(torch.device(self.torch_device)):
            pytest.skip(f"triton does not run on {self.torch_device} here")
        with peftops.force_backend(None if backend == "default" else backend):
            yield

    ns.update(_peftops_backend=_peftops_backend, __module__=__name__,
              __doc__=f"peft's {base.__name__} over peftops' cases on the {backend} backend (module docstring).")
    return type(name, (base,), ns), generic, hidden


BACKEND = os.environ.get("PEFTOPS_PEFT_SUITE_BACKEND", "reference")  # or "triton" / "default"

TestPeftCustomModelPeftops, GENERIC_CUSTOM, _hidden_custom = _generate(
    tcm.TestPeftCustomModel, "TestPeftCustomModelPeftops", BACKEND,
    {CASE_ARGS: (CASES, 2), "config_cls": (CONFIG_CLASSES, 0), "config0": (CONFIG_INSTANCES, 0)})
TestMultipleActiveAdaptersPeftops, GENERIC_MULTI, _hidden_multi = _generate(
    tcm.TestMultipleActiveAdapters, "TestMultipleActiveAdaptersPeftops", BACKEND, {MULTI_ARGS: (MULTI_CASES, 2)})
NOT_GENERIC = sorted(_hidden_custom + _hidden_multi)

if BACKEND == "reference":  # the Triton slice (redundant when the whole matrix already runs on the kernels)
    TestPeftCustomModelPeftopsTriton, _, _ = _generate(
        tcm.TestPeftCustomModel, "TestPeftCustomModelPeftopsTriton", "triton", {CASE_ARGS: (TRITON_CASES, 2)})
    TestMultipleActiveAdaptersPeftopsTriton, _, _ = _generate(
        tcm.TestMultipleActiveAdapters, "TestMultipleActiveAdaptersPeftopsTriton", "triton",
        {MULTI_ARGS: (TRITON_MULTI, 2)})


def test_generic_matrix_is_not_empty():
    """The classification found peft's generic tests (a peft release that renamed the case arguments would
    otherwise leave this module silently empty), our configs are PEFT configs, and every named skip names a
    test this peft version has."""
    assert issubclass(WeGeFTConfig, peft.PeftConfig) and issubclass(SIFTConfig, peft.PeftConfig)
    assert len(GENERIC_CUSTOM) >= 40, GENERIC_CUSTOM
    assert len(GENERIC_MULTI) >= 5, GENERIC_MULTI
    for test in SKIPS:
        assert test in GENERIC_CUSTOM + GENERIC_MULTI, f"SKIPS names {test}, which peft {suite.version} lacks"
