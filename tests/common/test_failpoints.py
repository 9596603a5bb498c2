"""Named failpoints: a real child process stopped, killed or failed at a named place,
once across processes, and nothing at all when no point is named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.failpoints import Action, FailpointError, Failpoints, parse_spec
from services.common.settings import CommonSettings, SettingsError, load_settings
from tests.support.failpoints import fired_pid, wait_fired

REPO = Path(__file__).resolve().parents[2]

# Hits "before" and "after" around a line of output; "after" only prints if the process survives.
CHILD = """
import sys
from pathlib import Path
from services.common.failpoints import Failpoints
points = Failpoints.from_spec(sys.argv[1], Path(sys.argv[2]))
for i in range(3):
    points.hit("demo.before")
    print(f"step {i}", flush=True)
    points.hit("demo.after")
print("done", flush=True)
"""


def run_child(spec: str, directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, spec, str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def test_kill_stops_the_process_exactly_there_and_only_once(tmp_path: Path) -> None:
    first = run_child("demo.after=kill@2", tmp_path)
    assert first.returncode == -signal.SIGKILL
    assert first.stdout.split("\n")[:2] == ["step 0", "step 1"]
    assert "step 2" not in first.stdout
    assert fired_pid(tmp_path, "demo.after") is not None
    # A restarted process meets the same point again and runs through it.
    second = run_child("demo.after=kill@2", tmp_path)
    assert second.returncode == 0
    assert second.stdout.split() == ["step", "0", "step", "1", "step", "2", "done"]


def test_stop_freezes_the_process_until_the_test_decides(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "demo.before=stop@3", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        pid = wait_fired(tmp_path, "demo.before", timeout=30)
        assert pid == child.pid
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/stat").read_text().split()[2] != "T":
            assert time.monotonic() < deadline, "the process never stopped"
            time.sleep(0.02)
        os.kill(pid, signal.SIGCONT)
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0
    assert out.split("\n")[:4] == ["step 0", "step 1", "step 2", "done"]


def test_error_raises_at_the_point(tmp_path: Path) -> None:
    points = Failpoints.from_spec("demo.before=error", tmp_path)
    points.hit("demo.other")
    with pytest.raises(FailpointError, match=r"demo\.before"):
        points.hit("demo.before")
    points.hit("demo.before")  # fired once already: runs through


def test_no_points_named_touches_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "markers"
    points = Failpoints.from_spec("", directory)
    assert not points.active
    for _ in range(1000):
        points.hit("demo.before")
    assert not directory.exists()
    assert run_child("", directory).stdout.split()[-1] == "done"


def test_spec_parsing() -> None:
    assert parse_spec(" a.b=kill , c=sleep:0.5@3,d=kill-group ") == {
        "a.b": Action("kill"),
        "c": Action("sleep", 3, 0.5),
        "d": Action("kill-group"),
    }
    for bad in ("a", "a=", "=kill", "a=explode", "a=kill@0", "a=sleep:x", "a=kill@x"):
        with pytest.raises(ValueError, match=r"a|="):
            parse_spec(bad)


def test_settings_refuse_a_bad_spec() -> None:
    with pytest.raises(SettingsError, match="COINSTORE_FAILPOINTS"):
        load_settings(CommonSettings, {"COINSTORE_FAILPOINTS": "x=explode"})
    settings = load_settings(CommonSettings, {"COINSTORE_FAILPOINTS": "x=kill", "COINSTORE_FAILPOINTS_DIR": "/tmp/fp"})
    assert settings.failpoint_set().active
