"""peft's own generic test suite, fetched at test time (never vendored into this repository).

The peft sdist on PyPI ships its ``tests/`` folder. ``load()`` gets the sdist of the *installed* peft version
(``pip download --no-deps --no-binary :all: peft==<version>``), extracts only the three files the custom-model
matrix needs (``testing_common.py``, ``testing_utils.py``, ``test_custom_models.py``) into a per-version cache,
and imports them as a private package, so repeated runs download nothing.

Where the files come from, in order:

* ``PEFTOPS_PEFT_TESTS_DIR``: an existing folder holding peft's test files (e.g. ``<peft checkout>/tests``);
  nothing is downloaded.
* ``PEFTOPS_PEFT_TESTS_CACHE`` (default ``~/.cache/peftops/peft-tests``) ``/<version>/tests``: filled by the
  first run (extracted to a temporary folder, then renamed into place, so concurrent runs never see half a
  folder).

Import details:

* peft's test modules import each other relatively (``from .testing_common import ...``), so they are imported
  as submodules of a synthetic package, ``_peftops_upstream_peft_tests``, whose ``__path__`` is the folder. No
  ``sys.path`` entry is added, so nothing can clash with this project's ``tests/conftest.py`` or
  ``tests/helpers.py`` (peft's sdist ships no conftest.py; the classes used here need no peft fixtures).
* ``testing_common`` imports ``diffusers`` and ``testing_utils`` imports ``datasets`` at module level, only for
  Stable-Diffusion and dataset-loading tests that are never run here. Where either is not installed, a stub
  module stands in for the duration of the import and is removed from ``sys.modules`` afterwards, so other
  tests still see the package as absent.

If the files cannot be had (no network, a peft dev version not on PyPI), ``load()`` raises ``Unavailable``;
the caller turns that into a module skip, unless ``PEFTOPS_REQUIRE_PEFT_TESTS=1`` (set it in CI), in which
case the test module errors instead of skipping silently.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

PACKAGE = "_peftops_upstream_peft_tests"
FILES = ("testing_common.py", "testing_utils.py", "test_custom_models.py")
DOWNLOAD_TIMEOUT_S = int(os.environ.get("PEFTOPS_PEFT_TESTS_TIMEOUT", "300"))


class Unavailable(RuntimeError):
    """peft's test files could not be found or downloaded."""


def required() -> bool:
    return os.environ.get("PEFTOPS_REQUIRE_PEFT_TESTS", "") not in ("", "0")


def peft_version() -> str:
    import peft

    return peft.__version__


def cache_root() -> Path:
    env = os.environ.get("PEFTOPS_PEFT_TESTS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peftops" / "peft-tests"


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in FILES)


def _download(version: str, dest: Path) -> None:
    """pip-download peft's sdist and extract ``tests/<FILES>`` into ``dest`` (atomically)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"peft=={version}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"`pip download peft=={version}` took longer than {DOWNLOAD_TIMEOUT_S}s") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise Unavailable(f"`pip download peft=={version}` failed (exit {proc.returncode}): {' | '.join(tail)}")
        sdists = [p for p in Path(tmp).iterdir() if p.name.endswith((".tar.gz", ".tgz"))]
        if not sdists:
            raise Unavailable(f"`pip download peft=={version}` produced no sdist in {tmp}")
        staging = Path(tmp) / "tests"
        staging.mkdir()
        with tarfile.open(sdists[0]) as tar:
            wanted = {}
            for member in tar.getmembers():
                parts = member.name.split("/")
                # <sdist root>/tests/<file>: top-level test files only
                if len(parts) == 3 and parts[1] == "tests" and parts[2] in FILES and member.isfile():
                    wanted[parts[2]] = member
            missing = set(FILES) - set(wanted)
            if missing:
                raise Unavailable(f"peft {version}'s sdist has no tests/{', tests/'.join(sorted(missing))}")
            for name, member in wanted.items():
                src = tar.extractfile(member)
                (staging / name).write_bytes(src.read())
        try:
            os.replace(staging, dest)
        except OSError:
            if not _complete(dest):  # another process won the race with a complete copy: fine
                raise


def tests_dir() -> Path:
    """The folder holding peft's test files for the installed version (downloading it if needed)."""
    env = os.environ.get("PEFTOPS_PEFT_TESTS_DIR")
    if env:
        folder = Path(env).expanduser()
        if not _complete(folder):
            raise Unavailable(f"PEFTOPS_PEFT_TESTS_DIR={env} lacks one of {', '.join(FILES)}")
        return folder
    version = peft_version()
    folder = cache_root() / version / "tests"
    if not _complete(folder):
        if folder.exists():  # a partial folder (interrupted by hand): start again
            shutil.rmtree(folder, ignore_errors=True)
        _download(version, folder)
    return folder


@contextlib.contextmanager
def _stub_missing(names_attrs):
    """Stand-in modules for optional imports peft's test modules make at module level but never use here."""
    added = []
    for name, attrs in names_attrs.items():
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.__doc__ = "stub inserted by tests/_peft_suite.py while importing peft's test modules"
            for attr in attrs:
                setattr(stub, attr, None)
            sys.modules[name] = stub
            added.append(name)
    try:
        yield added
    finally:
        for name in added:
            sys.modules.pop(name, None)


_LOADED = None


def load():
    """Import peft's ``test_custom_models`` (and with it ``testing_common``/``testing_utils``); cached."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    folder = tests_dir()
    if PACKAGE not in sys.modules:
        pkg = types.ModuleType(PACKAGE)
        pkg.__path__ = [str(folder)]
        pkg.__file__ = None
        pkg.__package__ = PACKAGE
        sys.modules[PACKAGE] = pkg
    with _stub_missing({"diffusers": ["StableDiffusionPipeline"], "datasets": ["load_dataset"]}) as stubbed:
        try:
            tcm = importlib.import_module(f"{PACKAGE}.test_custom_models")
        except ImportError as exc:
            raise Unavailable(f"importing peft's test_custom_models from {folder} failed: {exc!r}") from exc
    common = sys.modules[f"{PACKAGE}.testing_common"]
    utils = sys.modules[f"{PACKAGE}.testing_utils"]
    _LOADED = types.SimpleNamespace(folder=folder, custom_models=tcm, testing_common=common, testing_utils=utils,
                                    stubbed=stubbed, version=peft_version())
    return _LOADED


def load_or_skip():
    """``load()``, or a module-level pytest skip with the reason (an error where PEFTOPS_REQUIRE_PEFT_TESTS=1)."""
    import pytest

    try:
        return load()
    except Unavailable as exc:
        if required():
            raise
        pytest.skip(f"peft's test suite is unavailable: {exc}", allow_module_level=True)
