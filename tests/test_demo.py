"""The README's demo command really works: python -m mkiso.demo end to end."""

import glob
import json
import os
import signal
import subprocess
import sys
import urllib.request

import pydicom
from prometheus_client.parser import text_string_to_metric_families

from mkiso import demo


def test_demo_serves_health_and_a_download_then_stops(tmp_path):
    http_port = demo.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mkiso.demo", "--dir", str(tmp_path / "demo"), "--http-port", str(http_port),
         "--pacs-port", str(demo.free_port()), "--receiver-port", str(demo.free_port()),
         "--publisher-port", str(demo.free_port())],
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
        with urllib.request.urlopen(base + "/send_rimage_multiple.php?accession_number=ACC2001", timeout=60) as answer:
            printed = json.load(answer)
        with urllib.request.urlopen(base + "/", timeout=30) as answer:
            assert answer.headers["Content-Type"].startswith("text/html") and b"<html" in answer.read().lower()
        with urllib.request.urlopen(base + "/metrics", timeout=30) as answer:
            samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                       for family in text_string_to_metric_families(answer.read().decode("utf-8"))
                       for sample in family.samples}
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output.decode()
    text = output.decode()
    assert "curl -s %s/api/health" % base in text
    burned = str(tmp_path / "demo" / "publisher" / "burned")
    for line in ("The desk page: %s/" % base, "Metrics (Prometheus): %s/metrics" % base,
                 "Printed images are \"burned\" into %s" % burned, "/send_rimage_multiple.php?accession_number="):
        assert line in text, line
    # Print works out of the box: every image the demo PACS holds for ACC2001 landed in the publisher's folder.
    stored = glob.glob(str(tmp_path / "demo" / "pacs" / "storage" / "*" / "*.dcm"))
    held = {str(header.SOPInstanceUID) for header in (pydicom.dcmread(path, stop_before_pixels=True) for path in stored)
            if header.AccessionNumber == "ACC2001"}
    landed = {str(pydicom.dcmread(os.path.join(burned, name), stop_before_pixels=True).SOPInstanceUID)
              for name in os.listdir(burned)}
    assert printed["status"] == "sent" and printed["instances"] == len(held) > 0
    assert landed == held
    assert samples[("mkiso_jobs_total", (("action", "print"), ("state", "done")))] == 1
    assert samples[("mkiso_jobs_total", (("action", "download"), ("state", "done")))] == 1
    assert os.listdir(str(tmp_path / "demo" / "work")) == []
    pids = subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True).stdout.split()
    assert pids == [], "demo processes outlived the demo"
