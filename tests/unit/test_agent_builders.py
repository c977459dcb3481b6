"""The agent's builder storage: probed once per workdir, whoever asks first."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent.builders import storage_command, storage_driver


def test_concurrent_first_builds_agree_on_one_storage_driver(tmp_path: Path) -> None:
    # Every slot of a fresh node asks at once: each must get the answer, none may trip over the
    # others' probe (a shared probe folder and answer file once failed one build in the batch).
    askers = 8
    start = threading.Barrier(askers)

    def ask() -> str:
        start.wait()
        return storage_driver(str(tmp_path))

    with ThreadPoolExecutor(askers) as pool:
        answers = list(pool.map(lambda _: ask(), range(askers)))
    assert len(set(answers)) == 1
    assert answers[0] in {"overlay", "vfs"}
    assert (tmp_path / "storage" / "driver").read_text() == answers[0]
    assert not (tmp_path / "storage" / ".overlay-probe").exists()
    assert storage_command("buildah", str(tmp_path))[-2:] == ["--storage-driver", answers[0]]
