"""Benchmark: one download of a large study, end to end, against a reference.

The reference is the same work done by hand with the bare tools in the same
run: movescu into a plain storescp, then genisoimage over what arrived (no
DICOMDIR, no checks).  mkiso's row is the HTTP download of the same study
through a real mkiso-server.  A second table times the staging step (placing
every file into the disc tree) with the Cython extension and the pure-Python
twin.  Ratios, not absolute numbers, are what carries across machines.

    .venv/bin/python bench/bench_download.py [--images 1000] [--image-kb 512]
"""

import argparse
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from mkiso import demo, fastcopy  # noqa: E402

TOOL_ENV = dict(os.environ, TCP_NODELAY="1")
REPEATS = 3


def timed(function):
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def best_of(function):
    """The fastest of REPEATS runs: the least disturbed by the rest of the machine."""
    runs = [timed(function) for _ in range(REPEATS)]
    return min(runs, key=lambda run: run[0])


def reference_run(root, pacs, study, ref_port):
    """movescu into a bare storescp, then genisoimage: the floor mkiso builds on."""
    inbox = os.path.join(root, "ref-inbox")
    os.makedirs(inbox)
    scp = subprocess.Popen(["storescp", "-aet", "BENCHREF", "-od", inbox, "+xa", "-dhl", str(ref_port)],
                           env=TOOL_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    demo.wait_for_port(ref_port)
    try:
        def run():
            subprocess.run(["movescu", "-S", "-aet", "BENCHREF", "-aec", "ABPACS", "-aem", "BENCHREF",
                            "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=" + study.study_uid,
                            "127.0.0.1", str(pacs.port)], env=TOOL_ENV, check=True)
            subprocess.run(["genisoimage", "-quiet", "-J", "-joliet-long", "-r", "-input-charset", "utf-8",
                            "-o", os.path.join(root, "ref.iso"), inbox], check=True)
            return os.path.getsize(os.path.join(root, "ref.iso"))
        return best_of(run)
    finally:
        scp.kill()
        scp.wait()


def mkiso_run(root, pacs, receiver_port, accession, retrieve):
    """A real mkiso-server retrieving by C-MOVE (through its receiver) or C-GET."""
    http_port = demo.free_port()
    config = os.path.join(root, "config.yaml")
    with open(config, "w") as handle:
        handle.write(
            "server: {port: %d}\npacs: {ae_title: ABPACS, host: 127.0.0.1, port: %d, retrieve: %s}\n"
            "receiver: {port: %d}\npaths: {work_dir: %s}\nlimits: {min_free_bytes: 100000000}\n"
            "logging: {level: warning}\n"
            % (http_port, pacs.port, retrieve, receiver_port, os.path.join(root, "work")))
    server = subprocess.Popen([sys.executable, "-m", "mkiso", "--config", config])
    try:
        demo.wait_for_port(http_port, timeout=30)
        url = "http://127.0.0.1:%d/api/iso/download?accession_number=%s" % (http_port, accession)

        def run():
            size = 0
            with urllib.request.urlopen(url, timeout=3600) as answer:
                while True:
                    chunk = answer.read(1 << 20)
                    if not chunk:
                        return size
                    size += len(chunk)
        seconds, size = best_of(run)
        with open("/proc/%d/status" % server.pid) as status:
            peak_kb = int([line for line in status if line.startswith("VmHWM")][0].split()[1])
        return seconds, size, peak_kb
    finally:
        server.terminate()
        server.wait(60)


def staging_rows(source_files, root):
    """Place every file into a fresh tree: links on the same fs, copies to tmpfs."""
    rows = []
    targets = {"link (same fs)": os.path.join(root, "stage")}
    if os.path.isdir("/dev/shm"):
        targets["copy (to tmpfs)"] = tempfile.mkdtemp(prefix="mkiso-bench-", dir="/dev/shm")
    implementations = [("python", fastcopy.py_place_files)]
    if fastcopy.IMPLEMENTATION == "cython":
        from mkiso import _fastcopy
        implementations.append(("cython", _fastcopy.place_files))
    try:
        for kind, base in targets.items():
            results = {}
            for repeat in range(REPEATS):
                # alternate the order so that neither side always runs on a warmer cache
                for name, place in implementations[::1 if repeat % 2 == 0 else -1]:
                    folder = os.path.join(base, name)
                    os.makedirs(folder)
                    pairs = [(path, os.path.join(folder, "IMG%05d" % i)) for i, path in enumerate(source_files)]
                    seconds, _ = timed(functools.partial(place, pairs))
                    results[name] = min(seconds, results.get(name, seconds))
                    shutil.rmtree(folder)
            rows.append((kind, results))
    finally:
        for base in targets.values():
            shutil.rmtree(base, ignore_errors=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image-kb", type=int, default=512)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="mkiso-bench-")
    try:
        receiver_port, ref_port = demo.free_port(), demo.free_port()
        study = demo.SampleStudy("BENCH-1", "BENCH^MARK", "BENCH1000", series=(args.images,),
                                 image_bytes=args.image_kb * 1024)
        pacs = demo.Dcmqrscp(os.path.join(root, "pacs"), demo.free_port(),
                             {"CDRECORD": receiver_port, "BENCHREF": ref_port})
        print("generating %d images of %d KB ..." % (args.images, args.image_kb), flush=True)
        files = pacs.add_studies([study])
        pacs.start()
        try:
            ref_s, ref_bytes = reference_run(root, pacs, study, ref_port)
            runs = {retrieve: mkiso_run(root, pacs, receiver_port, study.accession, retrieve)
                    for retrieve in ("move", "get")}
        finally:
            pacs.stop()
        stage = staging_rows(files, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print()
    print("End to end, one study of %d images (%d MB of images)" % (args.images, args.images * args.image_kb // 1024))
    print("| run (best of %d) | seconds | ISO MB | MB/s | ratio to reference |" % REPEATS)
    print("|---|---|---|---|---|")
    print("| reference: movescu + storescp + genisoimage | %.2f | %d | %.0f | 1.00 |"
          % (ref_s, ref_bytes >> 20, (ref_bytes >> 20) / ref_s))
    for retrieve, (mkiso_s, mkiso_bytes, _) in runs.items():
        print("| mkiso, pacs.retrieve: %s: GET /api/iso/download (find, manifest, %s, checks, DICOMDIR, ISO, "
              "send) | %.2f | %d | %.0f | %.2f |"
              % (retrieve, "C-" + retrieve.upper(), mkiso_s, mkiso_bytes >> 20, (mkiso_bytes >> 20) / mkiso_s,
                 mkiso_s / ref_s))
    print()
    for retrieve, (_, mkiso_bytes, peak_kb) in runs.items():
        print("mkiso-server peak RSS (VmHWM), %s: %d MB for a %d MB ISO" % (retrieve, peak_kb // 1024,
                                                                         mkiso_bytes >> 20))
    print()
    print("Staging %d files into the disc tree" % len(files))
    print("| placement (best of %d) | python twin s | cython s | python / cython |" % REPEATS)
    print("|---|---|---|---|")
    for kind, results in stage:
        cython_s = results.get("cython")
        print("| %s | %.3f | %s | %s |" % (
            kind, results["python"], "%.3f" % cython_s if cython_s else "n/a",
            "%.2f" % (results["python"] / cython_s) if cython_s else "n/a"))


if __name__ == "__main__":
    main()
