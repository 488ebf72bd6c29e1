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
from discs import open_iso


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
README_BASE = "http://127.0.0.1:8080"


def readme_curl_lines():
    """Every curl command the README shows (its demo's and its install's)."""
    with open(README, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.startswith("curl ")]


def run_the_readmes_curl_lines(base, tmp_path):
    """The README's curl lines, as an admin pastes them, against the demo: each works; the download line
    for an accession the PACS does not have fails (curl's exit 22) and leaves no file, where it saved
    the error as a file named ``download``, exit 0. Returns the downloaded ACC2001 disc."""
    lines = [line.replace(README_BASE, base) for line in readme_curl_lines()]
    assert len(lines) >= 5 and all("--fail" in line for line in lines), lines
    done = tmp_path / "curl"
    done.mkdir()
    for line in lines:
        result = subprocess.run(line, shell=True, cwd=str(done), capture_output=True, timeout=120)
        assert result.returncode == 0, (line, result.stderr[-500:])
    discs = sorted(os.listdir(str(done)))
    assert "ACC2001.iso" in discs and len(discs) == 2, discs  # the multi-download is named after its patient
    for name in discs:
        with open(str(done / name), "rb") as handle:
            handle.seek(32769)
            assert handle.read(5) == b"CD001", name  # an ISO 9660 volume, not an error page
    [download] = [line for line in lines if "/api/iso/download?" in line]
    failed = tmp_path / "failed"
    failed.mkdir()
    result = subprocess.run(download.replace("ACC2001", "NOSUCH1"), shell=True, cwd=str(failed),
                            capture_output=True, timeout=120)
    assert result.returncode == 22 and b"404" in result.stderr, result
    assert os.listdir(str(failed)) == []
    return open_iso(str(done / "ACC2001.iso"), str(tmp_path / "ACC2001"))


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
        readme_disc = run_the_readmes_curl_lines(base, tmp_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output.decode()
    text = output.decode()
    tried = [line.strip() for line in text.splitlines() if line.strip().startswith("curl ")]
    assert tried and set(tried) <= {line.replace(README_BASE, base) for line in readme_curl_lines()}, tried
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
    # The demo's viewer is a placeholder, and the disc says so: no viewer program is claimed.
    with open(os.path.join(readme_disc.root, "README.TXT"), encoding="ascii") as handle:
        readme_txt = handle.read()
    assert "A DICOM viewer is on this disc" not in readme_txt
    assert "No viewer program is on this disc (of the hospital's viewer folder it holds only VIEWER.TXT)" in readme_txt
    with open(os.path.join(readme_disc.root, "VIEWER.TXT"), encoding="ascii") as handle:
        assert handle.read().startswith("A placeholder, not a viewer")
    pids = subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True).stdout.split()
    assert pids == [], "demo processes outlived the demo"
