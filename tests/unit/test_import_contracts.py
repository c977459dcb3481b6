"""The import contracts of tests/contracts.py catch what they promise to, on a package made here.

lint-imports runs on a throwaway project in a temporary folder, with its own config: a contract
that never broke could be checking nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.lab import REPO

CONFIG = """\
[importlinter]
root_packages =
    shipped
    checks
include_external_packages = True
contract_types =
    stdlib_only: tests.contracts.StdlibOnlyContract
    independent_by_name: tests.contracts.IndependentByNameContract

[importlinter:contract:stdlib]
name = shipped imports the standard library only
type = stdlib_only
source_modules =
    shipped

[importlinter:contract:tests]
name = no test module imports another
type = independent_by_name
containers =
    checks
    checks.unit
pattern = test_*
"""


def lint(root: Path, files: dict[str, str]) -> subprocess.CompletedProcess[str]:
    for name, text in {
        "shipped/__init__.py": "",
        "checks/__init__.py": "",
        "checks/unit/__init__.py": "",
        "checks/helpers.py": "import json\n",
        **files,
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    (root / ".importlinter").write_text(CONFIG)
    lint_imports = Path(sys.executable).parent / "lint-imports"
    return subprocess.run(
        [str(lint_imports), "--no-cache"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(REPO)])},
        capture_output=True,
        text=True,
        timeout=60,
    )


CLEAN = {
    "shipped/main.py": "import json\nimport os.path\nfrom shipped import store\n",
    "shipped/store.py": "from __future__ import annotations\nimport hashlib\n",
    "checks/test_one.py": "import pytest\nfrom checks import helpers\n",
    "checks/unit/test_two.py": "from checks.helpers import json\n",
}


def test_a_clean_project_keeps_both_contracts(tmp_path: Path) -> None:
    done = lint(tmp_path, CLEAN)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("path", "text", "named"),
    [
        # A third-party package: pytest is installed, yet not the standard library.
        ("shipped/main.py", "import json\nimport pytest\n", "shipped.main imports pytest"),
        # Deep in a subpackage, and a project package that is not the source.
        ("shipped/deep/__init__.py", "from checks import helpers\n", "shipped.deep imports checks.helpers"),
        # A test module importing another, directly...
        (
            "checks/test_one.py",
            "from checks.unit import test_two\n",
            "checks.test_one imports checks.unit.test_two",
        ),
        # ...or through a helper.
        (
            "checks/helpers.py",
            "from checks import test_one\n",
            "checks.unit.test_two imports checks.test_one",
        ),
    ],
)
def test_each_contract_names_what_breaks_it(tmp_path: Path, path: str, text: str, named: str) -> None:
    done = lint(tmp_path, {**CLEAN, path: text})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 kept, 1 broken" in done.stdout
    assert named in " ".join(done.stdout.split()), done.stdout
