"""Benchmark: mkiso-verify's read-back of a disc, as an ISO, a ZIP and a folder (SPEC §4.6).

The issue's number: a 10,000-image disc read back within 2 s here.  The
disc is mkiso's own layout and DICOMDIR of one synthetic study
(``demo.write_large_study``: noise pixels, as in bench_download.py), with
SHA256.TXT, made into an ISO with the service's genisoimage arguments and a
ZIP of stored entries (tests/media.py).  Each row is the median of --runs
calls of ``verify.check`` in this process, the files in the page cache (the
state right after the service wrote them): what the read-back costs a job.
Beside it, sha256sum over the same files, the bare tool's time for the
checksums alone.

    .venv/bin/python bench/bench_verify.py [--sizes 10000x128,2000x512] [--runs 3]

Needs genisoimage and coreutils' sha256sum; the discs go to MKISO_BENCH_DIR
(about 4 GB for 10,000 x 128 KB: the tree, its ISO and its ZIP).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

from mkiso.disc import verify  # noqa: E402
import media  # noqa: E402


def timed(function, runs):
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def bench_size(work, images, image_kb, runs):
    root = os.path.join(work, "disc")
    started = time.perf_counter()
    media.synthetic_disc(root, images, image_kb * 1024)
    iso = media.make_iso(root, os.path.join(work, "disc.iso"))
    archive = media.make_zip(root, os.path.join(work, "disc.zip"))
    print("%d x %d KB: made in %.1f s, ISO %.0f MB" % (
        images, image_kb, time.perf_counter() - started, os.path.getsize(iso) / 1e6), flush=True)
    for kind, path in (("ISO", iso), ("ZIP", archive), ("folder", root)):
        seconds, report = timed(lambda path=path: verify.check(path), runs)
        assert report.ok and report.objects == images, report.verdict()
        print("  mkiso-verify %-6s %6.2f s  %s" % (kind, seconds, report.verdict()), flush=True)
    names = [name for name in media.files_of(root) if name != media.MANIFEST]
    seconds, _ = timed(lambda: subprocess.run(["sha256sum", "--quiet", "-c", media.MANIFEST], cwd=root, check=True,
                                              stdout=subprocess.DEVNULL), runs)
    print("  sha256sum -c (the folder, one thread, %d files) %6.2f s" % (len(names), seconds), flush=True)
    shutil.rmtree(work)
    os.makedirs(work)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000x128,2000x512", help="IMAGESxKB, comma separated")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="mkiso-bench-verify-", dir=os.environ.get("MKISO_BENCH_DIR"))
    try:
        for size in args.sizes.split(","):
            images, image_kb = (int(part) for part in size.split("x"))
            bench_size(work, images, image_kb, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
