#!/usr/bin/env bash
# Set up the lab (packages, binfmt_misc, registry, dockerd, virtual environment), then run every
# check: lint, formatting, types, the agent's Python 3.9 compatibility, and the test suite.
# Extra arguments go to pytest.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/deploy/lab/setup.sh"
cd "$repo"
.venv/bin/ruff check farm agent tests bench deploy
.venv/bin/ruff format --check farm agent tests bench deploy
.venv/bin/mypy
# The agent runs on nodes' own interpreters: nothing newer than Python 3.9 may slip in.
.venv/bin/vermin --target=3.9- --no-tips --violations --quiet agent
.venv/bin/pytest "$@"
