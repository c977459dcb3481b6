#!/usr/bin/env bash
# Every check of the project, in two lanes:
#
#   tests/run.sh [PYTEST ARGS...]         set up the lab (packages, binfmt_misc, registry, dockerd,
#                                          virtual environment), then lint, formatting, types, the
#                                          import contracts, the agent's Python 3.9 compatibility
#                                          and the whole test suite (what .ci/run calls)
#   tests/run.sh --fast [PYTEST ARGS...]  the same checks and every test that needs no lab (no
#                                          registry, sshd, builder or root set-up: pytest -m "not
#                                          lab"), without setting the lab up; well under a minute
#
# Extra arguments go to pytest.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fast=0
if [ "${1:-}" = "--fast" ]; then
  fast=1
  shift
fi
cd "$repo"

if [ "$fast" = 1 ]; then
  # The virtual environment alone, kept as deploy/lab/setup.sh keeps it (same stamp, so neither
  # lane reinstalls after the other): made if missing, reinstalled when pyproject.toml changed.
  state=${FARM_LAB_STATE:-$repo/.lab}
  stamp=$state/pyproject.sha256
  sum=$(sha256sum pyproject.toml | cut -d ' ' -f 1)
  if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null || true)" != "$sum" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    mkdir -p "$state"
    .venv/bin/pip install -q -e ".[dev]" >"$state/pip.log" 2>&1 || {
      echo "pip install -e '.[dev]' failed; see $state/pip.log" >&2
      exit 1
    }
    echo "$sum" >"$stamp"
  fi
else
  "$repo/deploy/lab/setup.sh"
fi

.venv/bin/ruff check farm agent tests bench deploy
.venv/bin/ruff format --check farm agent tests bench deploy
.venv/bin/mypy
# The layering rule (pyproject.toml [tool.importlinter]): the pure core imports no I/O module, the
# agent imports the standard library only, no test module imports another.
.venv/bin/lint-imports --no-cache
# The agent runs on nodes' own interpreters: nothing newer than Python 3.9 may slip in.
.venv/bin/vermin --target=3.9- --no-tips --violations --quiet agent
if [ "$fast" = 1 ]; then
  .venv/bin/pytest -m "not lab" "$@"
else
  .venv/bin/pytest "$@"
fi
