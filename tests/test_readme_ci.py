"""CI installs exactly what the README's first screen tells a new user to run."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [l for l in block.splitlines() if l.strip() and not l.lstrip().startswith("#")]


def test_readme_first_screen_has_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert cmds[0].endswith("python -m peftops.demo")
    assert cmds[1].endswith("pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    assert _readme_commands()[1] in ci


def test_setup_lists_every_subpackage():
    """A wheel (not only the editable install) must carry every package under peftops/ and kernels/."""
    text = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    listed = set(re.findall(r'"(peftops(?:\.\w+)*)"', re.search(r"packages=\[([^\]]*)\]", text).group(1)))
    found = {"peftops.kernels"}
    for dirpath, _, files in os.walk(os.path.join(ROOT, "peftops")):
        if "__init__.py" in files:
            found.add(os.path.relpath(dirpath, ROOT).replace(os.sep, "."))
    assert found <= listed, f"setup.py packages= misses {sorted(found - listed)}"
