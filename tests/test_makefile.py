"""The front door: `make install` installs and runs nothing, `make demo` and `make test` install the same
way first, and `.ci/run` calls the README's test command."""

import re
import subprocess

from tests.conftest import ROOT


def make_commands(target: str) -> list[str]:
    """The commands `make <target>` would run from scratch (dry run, every prerequisite out of date)."""
    # --no-print-directory: under `make test` (CI) this make is a sub-make, which would print
    # "Entering directory" lines
    proc = subprocess.run(["make", "--no-print-directory", "-n", "-B", target], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    return [line for line in proc.stdout.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_make_install_installs_and_runs_nothing_else():
    commands = make_commands("install")
    pip = [c for c in commands if " -m pip install " in c]
    assert any("-r requirements.txt" in c for c in pip) and any("-r requirements-dev.txt" in c for c in pip)
    assert all(c in pip or c.startswith(("test -x", "touch ")) for c in commands), commands
    assert not any(re.search(r"\d\d_\w+\.py|common\.demo|pytest", c) for c in commands)


def test_demo_and_test_install_like_make_install():
    install = make_commands("install")
    runtime = [c for c in install if "-r requirements.txt" in c]
    assert set(runtime) <= set(make_commands("demo"))  # the demo needs the pipeline only
    test = make_commands("test")
    assert set(install) <= set(test) and test[-1] == ".venv/bin/python -m pytest"


def test_readme_commands_and_ci():
    readme = (ROOT / "README.md").read_text()
    for command in ("make demo", "make test", "make install"):
        assert f"`{command}`" in readme or f"\n{command} " in readme, command
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test"  # the README's test command, nothing else
