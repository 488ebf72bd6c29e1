"""The README's demo command really works: python -m mkiso.demo end to end."""

import json
import os
import signal
import subprocess
import sys
import urllib.request

from mkiso import demo


def test_demo_serves_health_and_a_download_then_stops(tmp_path):
    http_port = demo.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mkiso.demo", "--dir", str(tmp_path / "demo"), "--http-port", str(http_port),
         "--pacs-port", str(demo.free_port()), "--receiver-port", str(demo.free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert demo.wait_for_port(http_port, timeout=60), "the demo did not start"
        base = "http://127.0.0.1:%d" % http_port
        with urllib.request.urlopen(base + "/api/health?strict=1", timeout=30) as answer:
            health = json.load(answer)
        assert health["checks"]["pacs"]["ok"], health
        with urllib.request.urlopen(base + "/api/iso/download?accession_number=ACC2001", timeout=60) as answer:
            assert answer.headers["Content-Type"] == "application/x-iso9660-image"
            assert len(answer.read()) == int(answer.headers["Content-Length"]) > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output.decode()
    text = output.decode()
    assert "curl -s %s/api/health" % base in text
    assert os.listdir(str(tmp_path / "demo" / "work")) == []
    pids = subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True).stdout.split()
    assert pids == [], "demo processes outlived the demo"
