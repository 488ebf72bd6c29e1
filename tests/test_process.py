"""Children run in their own process group and die whole on a timeout."""

import os
import time

import pytest

from mkiso import process


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open("/proc/%d/stat" % pid) as stat:
        return stat.read().split()[2] != "Z"


def test_timeout_kills_the_tool_and_what_it_forked(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = "sleep 60 & echo $! > %s; wait" % pid_file
    started = time.monotonic()
    with pytest.raises(process.ToolTimeout, match="ran longer than 0.5s"):
        process.run(["/bin/sh", "-c", script], timeout=0.5)
    assert time.monotonic() - started < 5
    grandchild = int(pid_file.read_text())
    time.sleep(0.1)
    assert not alive(grandchild), "a forked grandchild outlived the timeout"
    assert process.kill_all() == 0


def test_on_tick_is_called_while_the_tool_runs_and_the_timeout_still_holds():
    ticks = []
    with pytest.raises(process.ToolTimeout, match="ran longer than 0.3s"):
        process.run(["sleep", "5"], timeout=0.3, on_tick=lambda: ticks.append(time.monotonic()))
    assert len(ticks) >= 5, "on_tick was not called while the tool ran"
    result = process.run(["/bin/sh", "-c", "exit 4"], timeout=10, on_tick=lambda: None)
    assert result.returncode == 4
    assert process.kill_all() == 0


def test_output_and_exit_status_come_back():
    result = process.run(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert result.returncode == 3
    assert "out" in result.output and "err" in result.output


def test_tools_get_tcp_nodelay():
    result = process.run(["/bin/sh", "-c", "echo $TCP_NODELAY"], timeout=10)
    assert result.output.strip() == "1"


def test_missing_tool_is_a_clear_error(tmp_path):
    with pytest.raises(process.ToolMissing, match="cannot run .*/nope"):
        process.run([str(tmp_path / "nope")], timeout=10)


def test_kill_all_takes_down_running_children():
    proc = process.start(["sleep", "60"])
    assert process.kill_all() == 1
    assert proc.poll() is not None


def test_output_is_kept_as_a_bounded_tail_and_every_line_seen():
    """A C-MOVE of 10,000 images prints megabytes; only the end (the final response) is kept."""
    seen = []
    script = "i=0; while [ $i -lt 200000 ]; do echo line $i; i=$((i+1)); done; echo FINAL"
    result = process.run(["/bin/sh", "-c", script], timeout=60, on_line=seen.append)
    assert len(seen) == 200001 and seen[0] == "line 0\n"
    assert result.output.endswith("line 199999\nFINAL\n")
    assert len(result.output) <= process.TAIL_BYTES + 100


@pytest.mark.parametrize("output, sentence", [
    ("setpriv: activate capabilities: Operation not permitted\n",
     "setpriv was refused capset by the service's sandbox (setpriv: activate capabilities: Operation not permitted)"),
    ("genisoimage: Operation not permitted. Panic cannot set back effective uid.\n",
     "genisoimage was refused setreuid by the service's sandbox "
     "(genisoimage: Operation not permitted. Panic cannot set back effective uid.)"),
    ("setpriv: setresuid failed: Operation not permitted\n",
     "setpriv was refused by the service's sandbox (setpriv: setresuid failed: Operation not permitted)"),
    ("E: Association Request Failed: Peer aborted Association\n", ""),
    ("genisoimage: Permission denied. Unable to open disc image file 'x.iso'.\n", ""),
])
def test_a_refusal_by_the_sandbox_is_named(output, sentence):
    """util-linux's and genisoimage's own words, as they print them under SystemCallFilter."""
    assert process.refusal(output) == sentence
    if sentence:
        assert process.failure_reason("W: something\n" + output) == sentence
