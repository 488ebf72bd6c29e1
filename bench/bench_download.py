"""Benchmark: mkiso against the bare tools doing the same job, measured in one run.

The yardstick (SPEC §8) is the job done by hand with the bare tools at their
best: findscu; movescu into storescp (TCP_NODELAY=1); hard links into the
8-character PDI tree; dcmmkdir (what a person must run for a valid disc);
genisoimage to a file; the file read once.  mkiso's rows are HTTP downloads
of the same study through a real mkiso-server, by C-MOVE and by C-GET,
which check more (manifest, every header) on the way, and by C-GET without
the web content (``iso.web_content: false``): what the pages and previews cost, and the same
study as a ZIP (``format=zip``, the C-MOVE server) with its ratio to the ISO.  Every number is the
median of --runs runs, the two sides interleaved and each run started after
a sync, so that no run pays for the previous one's disk writeback, and
each side removing its files when its run ends, as mkiso does; ratios, not
seconds, carry across machines.

For each study size it prints: both sides' times and their ratio, the phase
split of both (mkiso's from its own log lines: ``digests`` is SHA256.TXT
and a ZIP's CRC-32, ``verify`` the read-back), mkiso-server's peak RSS,
delivery throughput of mkiso and of nginx (sendfile) sending the same cached
ISO in turns, and,
where Orthanc is the PACS, Orthanc's own media export (a deflated ZIP with a
DICOMDIR of images it already holds) as the peer row.  The synthetic pixels
are noise that deflates about 2:1, like real images: zeros would flatter a
ZIP and not an ISO.  dcmqrscp's index holds only
about 9,000 images (8,000 in four studies), so sizes above 6,000 use
Debian's orthanc.  Above
20,000 images the reference is left out: dcmmkdir's time grows with the
square of the count (hours at 50,000); mkiso's rows, its peak RSS and
Orthanc's export are still printed.  Last, the concurrency row: four
downloads of different studies one after the other, then all at once, each
on a fresh server: wall time, the ratio, peak RSS.

The floor (SPEC §8.1) is its own row: the bare C-MOVE, movescu into a quiet
storescp (no -v, TCP_NODELAY=1) of the same study in the same run, timed
from movescu's start to its exit; each mkiso row is also given as a ratio
to it.  ``--rows`` picks the rows (the default all of them): a run of the
two that matter at 10,000 images, ``--rows bare,move --concurrency none``,
takes minutes, where the reference's dcmmkdir alone takes several.

    .venv/bin/python bench/bench_download.py [--sizes 2000x512,10000x128] [--runs 3] [--pacs auto]
        [--concurrency 4x2000x64|none] [--rows reference,bare,move,get,noweb,zip,cache,peer]

Needs dcmtk, genisoimage, nginx and orthanc (Debian packages).
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from mkiso import demo, fastcopy  # noqa: E402

TOOL_ENV = dict(os.environ, TCP_NODELAY="1")
DCMQRSCP_MAX_IMAGES = 6000  # its index overflows (32 MB) near 9,000 images in one study, 8,000 in four
REFERENCE_MAX_IMAGES = 20000  # dcmmkdir: 8,000 images two minutes, 50,000 more than an hour
BLOCK = 1 << 20


def median(values):
    return statistics.median(values)


def run(args, **kwargs):
    subprocess.run(args, env=TOOL_ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)


def fetch(url):
    """GET, discarding the body: (seconds to headers, seconds in all, bytes)."""
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=7200) as answer:
        headers_at = time.perf_counter()
        size = 0
        while True:
            chunk = answer.read(BLOCK)
            if not chunk:
                break
            size += len(chunk)
    return headers_at - started, time.perf_counter() - started, size


def start_process(args, port, log_path, timeout=60):
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=TOOL_ENV, start_new_session=True)
    if not demo.wait_for_port(port, timeout=timeout):
        stop_process(proc)
        raise RuntimeError("%s did not start; see %s" % (args[0], log_path))
    return proc


def stop_process(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# -- the PACS ------------------------------------------------------------------

class Orthanc(demo.Orthanc):
    """Debian's Orthanc (``demo.Orthanc``), with its own media export as the peer row."""

    def export_seconds(self, study_uid):
        """Orthanc's own media export of the study: GET /studies/{id}/media, read whole."""
        request = urllib.request.Request(self.http + "/tools/lookup", data=study_uid.encode(), method="POST")
        with urllib.request.urlopen(request) as answer:
            orthanc_id = json.load(answer)[0]["ID"]
        return fetch(self.http + "/studies/%s/media" % orthanc_id)[1]


class Dcmqrscp(demo.Dcmqrscp):
    export_seconds = None

    def __init__(self, root, destinations):
        super().__init__(root, demo.free_port(), destinations)

    def load(self, folder, count):
        files = sorted(os.path.join(top, name) for top, _, names in os.walk(folder) for name in names)
        for at in range(0, len(files), 1000):  # dcmqridx takes the paths on its command line
            subprocess.run(["dcmqridx", self.storage] + files[at:at + 1000], check=True, stdout=subprocess.DEVNULL)
        assert len(files) == count


# -- the reference: the bare tools by hand -------------------------------------

def reference_run(root, pacs, study, ref_port):
    """One run of the job by hand; returns {phase: seconds}.

    Its files are removed when it ends, untimed, as mkiso removes a job's
    files when the answer is sent: so that neither side's writes land in
    memory the other just freed.  On this kind of VM that is worth a factor:
    memory freed a few seconds ago has been handed back to the host (free
    page reporting), and writing a page cache into it costs several times
    more kernel time than into memory freed a moment before.
    """
    inbox, tree, iso = (os.path.join(root, name) for name in ("ref-inbox", "ref-tree", "ref.iso"))
    os.makedirs(inbox)
    phases = {}
    scp = start_process(["storescp", "-aet", "BENCHREF", "-od", inbox, "+xa", "-dhl", str(ref_port)], ref_port,
                        os.path.join(root, "ref-storescp.log"))
    try:
        started = time.perf_counter()
        run(["findscu", "-S", "-aet", "BENCHREF", "-aec", pacs.ae_title, "-k", "QueryRetrieveLevel=STUDY",
             "-k", "AccessionNumber=" + study.accession, "-k", "StudyInstanceUID", "127.0.0.1", str(pacs.port)])
        phases["find"] = time.perf_counter() - started
        started = time.perf_counter()
        run(["movescu", "-S", "-aet", "BENCHREF", "-aec", pacs.ae_title, "-aem", "BENCHREF",
             "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=" + study.study_uid,
             "127.0.0.1", str(pacs.port)])
        phases["move"] = time.perf_counter() - started
    finally:
        stop_process(scp)
    started = time.perf_counter()
    series = os.path.join(tree, "DICOM", "PAT00001", "STU00001", "SER00001")
    os.makedirs(series)
    for number, name in enumerate(sorted(os.listdir(inbox)), start=1):
        os.link(os.path.join(inbox, name), os.path.join(series, "IMG%05d" % number))
    phases["link"] = time.perf_counter() - started
    started = time.perf_counter()
    run(["dcmmkdir", "+I", "+r", "+D", "DICOMDIR", "DICOM"], cwd=tree)
    phases["dicomdir"] = time.perf_counter() - started
    started = time.perf_counter()
    run(["genisoimage", "-quiet", "-J", "-joliet-long", "-r", "-o", iso, tree])
    phases["iso"] = time.perf_counter() - started
    started = time.perf_counter()
    with open(iso, "rb") as handle:
        while handle.read(BLOCK):
            pass
    phases["read"] = time.perf_counter() - started
    for path in (inbox, tree):
        shutil.rmtree(path)
    os.remove(iso)
    return phases


def bare_move_run(root, pacs, study, ref_port):
    """The floor: movescu into a quiet storescp, the C-MOVE alone; returns {"move": seconds}.

    storescp listens before the clock starts and its files go, untimed,
    when the run ends (as ``reference_run``).
    """
    inbox = os.path.join(root, "bare-inbox")
    os.makedirs(inbox)
    scp = start_process(["storescp", "-aet", "BENCHREF", "-od", inbox, "+xa", "-dhl", str(ref_port)], ref_port,
                        os.path.join(root, "bare-storescp.log"))
    try:
        started = time.perf_counter()
        run(["movescu", "-S", "-aet", "BENCHREF", "-aec", pacs.ae_title, "-aem", "BENCHREF",
             "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=" + study.study_uid,
             "127.0.0.1", str(pacs.port)])
        seconds = time.perf_counter() - started
    finally:
        stop_process(scp)
    shutil.rmtree(inbox)
    return {"move": seconds}


# -- mkiso ---------------------------------------------------------------------

MKISO_PHASES = ("find", "manifest", "transfer", "checks", "stage", "web", "dicomdir", "digests", "size", "iso", "zip",
                "verify")


NO_WEB = "get, iso.web_content false"
ZIP_ROW = "move, format=zip"  # the same server as the move row, the same disc as a ZIP (SPEC §13)


class MkisoServer:
    """A real mkiso-server retrieving by C-MOVE (through its receiver) or C-GET."""

    def __init__(self, root, pacs, receiver_port, retrieve, cache_bytes=0, web_content=True, name=None, tls="{}"):
        """``cache_bytes`` 0 (the cache off): every download really retrieves, as the rows must; ``tls``: the
        pacs.tls and receiver.tls mapping (YAML flow), for bench_tls.py."""
        self.http_port = demo.free_port()
        name = name or retrieve + ("-cached" if cache_bytes else "") + ("" if web_content else "-noweb")
        self.log_path = os.path.join(root, "mkiso-%s.log" % name)
        config = os.path.join(root, "mkiso-%s.yaml" % name)
        work_dir = self.work_dir = os.path.join(root, "work-" + name)
        os.makedirs(work_dir, exist_ok=True)
        with open(config, "w") as handle:
            handle.write(
                "server: {port: %d}\npacs: {ae_title: %s, host: 127.0.0.1, port: %d, retrieve: %s, tls: %s}\n"
                "receiver: {port: %d, tls: %s}\npaths: {work_dir: %s}\nlimits: {min_free_bytes: 100000000}\n"
                "timeouts: {find_s: 600, move_s: 7200, iso_s: 7200}\nlogging: {level: info, format: json}\n"
                "audit: {path: %s}\ncache: {max_bytes: %d}\niso: {web_content: %s}\n"
                % (self.http_port, pacs.ae_title, pacs.port, retrieve, tls, receiver_port, tls, work_dir,
                   os.path.join(root, "audit-%s.log" % name), cache_bytes, "true" if web_content else "false"))
        self.proc = start_process([sys.executable, "-m", "mkiso", "--config", config], self.http_port,
                                  self.log_path)

    def download(self, accession, medium="iso"):
        """One download (``medium`` iso or zip); its phases in seconds, from the client and from the
        server's log lines."""
        url = "http://127.0.0.1:%d/api/iso/download?accession_number=%s&format=%s" % (self.http_port, accession,
                                                                                     medium)
        with open(self.log_path) as log:
            log.seek(0, 2)
            first_byte, total, size = fetch(url)
            time.sleep(0.2)  # the access line is written when the answer ends
            lines = [json.loads(line) for line in log.read().splitlines() if line.startswith("{")]
        phases = {"total": total, "send": total - first_byte, "bytes": size}
        for line in lines:
            for phase in MKISO_PHASES:
                if phase + "_ms" in line:
                    phases[phase] = phases.get(phase, 0) + line[phase + "_ms"] / 1000
        return phases

    def peak_kb(self):
        with open("/proc/%d/status" % self.proc.pid) as status:
            return int([line for line in status if line.startswith("VmHWM")][0].split()[1])

    def stop(self):
        stop_process(self.proc)


class Nginx:
    """nginx (sendfile on) serving the files of ``folder``."""

    def __init__(self, root, folder):
        self.port = demo.free_port()
        home = os.path.join(root, "nginx")
        os.makedirs(home, exist_ok=True)
        conf = os.path.join(home, "nginx.conf")
        with open(conf, "w") as handle:
            handle.write(
                "%sworker_processes 1; daemon off; error_log %s/error.log; pid %s/nginx.pid;\n"
                "events {}\nhttp { access_log off; sendfile on; client_body_temp_path %s/b; proxy_temp_path %s/p;\n"
                "fastcgi_temp_path %s/f; uwsgi_temp_path %s/u; scgi_temp_path %s/s;\n"
                "server { listen 127.0.0.1:%d; location / { root %s; } } }\n"
                % ("user root; " if os.geteuid() == 0 else "", home, home, home, home, home, home, home,
                   self.port, folder))
        self.proc = start_process(["nginx", "-c", conf, "-p", home], self.port, os.path.join(home, "out.log"))

    def send_seconds(self, name):
        """Seconds from the headers to the last byte, as mkiso's ``send``."""
        first_byte, total, _ = fetch("http://127.0.0.1:%d/%s" % (self.port, name))
        return total - first_byte

    def stop(self):
        stop_process(self.proc)


# -- one study size ------------------------------------------------------------

def loaded_pacs(root, studies, destinations, pacs_choice):
    """The studies generated and held by a running PACS: dcmqrscp up to its index's limit, else Orthanc.

    Generated by ``demo.write_large_study`` (one image encoded per series,
    the others copies with their own UIDs): pydicom per image would take
    longer than the benchmark.
    """
    images = sum(study.image_count for study in studies)
    source = os.path.join(root, "source")
    for study in studies:
        demo.write_large_study(study, os.path.join(source, study.accession))
    if pacs_choice == "orthanc" or (pacs_choice == "auto" and images > DCMQRSCP_MAX_IMAGES):
        pacs = Orthanc(os.path.join(root, "orthanc"), destinations)
        pacs.start()
    else:
        pacs = Dcmqrscp(os.path.join(root, "pacs"), destinations)
        shutil.rmtree(pacs.storage)
        shutil.copytree(source, pacs.storage, copy_function=os.link)
        source = pacs.storage
    print("  loading %d images into %s ..." % (images, type(pacs).__name__), flush=True)
    try:
        pacs.load(source, images)
        if isinstance(pacs, Dcmqrscp):
            pacs.start()
    except BaseException:
        pacs.stop()
        raise
    if isinstance(pacs, Orthanc):
        shutil.rmtree(source)  # Orthanc holds its own copy
    return pacs


ROWS = ("reference", "bare", "move", "get", "noweb", "zip", "cache", "peer")
ROW_NAMES = {"move": "move", "get": "get", "noweb": NO_WEB, "zip": ZIP_ROW}


def bench_size(images, image_kb, runs, root, pacs_choice, rows=ROWS):
    receiver_port, ref_port = demo.free_port(), demo.free_port()
    destinations = {"CDRECORD": receiver_port, "BENCHREF": ref_port}
    study = demo.SampleStudy("BENCH-1", "BENCH^MARK", "BENCH%d" % images, series=(images,),
                             image_bytes=image_kb * 1024, noise=True)  # compressible as real images are
    print("%d images of %d KB: generating ..." % (images, image_kb), flush=True)
    pacs = loaded_pacs(root, [study], destinations, pacs_choice)
    cached = delivery = iso_bytes = peer = None
    try:
        servers = {}
        if "move" in rows or "zip" in rows:
            servers["move"] = MkisoServer(root, pacs, receiver_port, "move")
        if "get" in rows:
            servers["get"] = MkisoServer(root, pacs, receiver_port, "get")
        if "noweb" in rows:
            # The web content's cost (SPEC §4.4): the same C-GET row without it (C-GET: no second receiver).
            servers[NO_WEB] = MkisoServer(root, pacs, receiver_port, "get", web_content=False)
        timed = [ROW_NAMES.get(row, row) for row in ROWS if row in rows and row not in ("cache", "peer")]
        if images > REFERENCE_MAX_IMAGES and "reference" in timed:
            timed.remove("reference")
        results = {row: [] for row in timed}
        try:
            for number in range(1, runs + 1):
                # Interleaved, each after a sync: every run starts without the last one's writeback;
                # the order turns each round, so that no row always follows the same one.
                turn = (number - 1) % len(timed)
                order = timed[turn:] + timed[:turn]
                print("  run %d: %s ..." % (number, ", ".join(order)), flush=True)
                for row in order:
                    os.sync()
                    if row == "reference":
                        results[row].append(reference_run(root, pacs, study, ref_port))
                    elif row == "bare":
                        results[row].append(bare_move_run(root, pacs, study, ref_port))
                    elif row == ZIP_ROW:
                        results[row].append(servers["move"].download(study.accession, "zip"))
                    else:
                        results[row].append(servers[row].download(study.accession))
            peaks = {retrieve: server.peak_kb() for retrieve, server in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
        if "cache" in rows:
            cached, delivery, iso_bytes = cache_rows(root, pacs, study, receiver_port, runs)
        if "peer" in rows and pacs.export_seconds is not None:
            print("  Orthanc media export ...", flush=True)
            peer = median([pacs.export_seconds(study.study_uid) for _ in range(runs)])
    finally:
        pacs.stop()
    reference, bare = results.pop("reference", []), results.pop("bare", [])
    report(images, image_kb, runs, type(pacs).__name__, reference, bare, results, peaks, peer, delivery, iso_bytes,
           cached)


def cache_rows(root, pacs, study, receiver_port, runs):
    """mkiso with its disc cache: (the first download and the same disc again, delivery seconds of mkiso and of
    nginx sending that cached ISO in turns, the ISO's bytes)."""
    print("  mkiso with its disc cache: a first download, then the same disc again, "
          "alternated with nginx sending that cached file ...", flush=True)
    cached_server = MkisoServer(root, pacs, receiver_port, "move", cache_bytes=50 * 10 ** 9)
    cache_dir = os.path.join(cached_server.work_dir, "cache")
    nginx = Nginx(root, cache_dir)
    try:
        os.sync()
        cached = [cached_server.download(study.accession)["total"]]
        iso_name = os.path.join(os.listdir(cache_dir)[0], "disc.iso")  # an entry: its tree and its ISO
        delivery = {"mkiso": [], "nginx": []}
        for _ in range(runs):
            again = cached_server.download(study.accession)
            cached.append(again["total"])
            delivery["mkiso"].append(again["send"])
            delivery["nginx"].append(nginx.send_seconds(iso_name))
        iso_bytes = os.path.getsize(os.path.join(cache_dir, iso_name))
    finally:
        nginx.stop()
        cached_server.stop()
    return cached, delivery, iso_bytes


def report(images, image_kb, runs, pacs_name, reference, bare, mkiso, peaks, peer, delivery, iso_bytes, cached):
    ref_total = median([sum(phases.values()) for phases in reference]) if reference else None
    bare_total = median([phases["move"] for phases in bare]) if bare else None

    def ratio(seconds, to=ref_total):
        return "%.2f" % (seconds / to) if to else "n/a"

    print()
    iso_mb = " ISO %d MB" % (iso_bytes >> 20) if iso_bytes else ""
    print("### %d images x %d KB (PACS: %s; medians of %d runs;%s)" % (images, image_kb, pacs_name, runs, iso_mb))
    print()
    print("| run | seconds | ratio to reference | ratio to the bare C-MOVE |")
    print("|---|---|---|---|")
    if ref_total:
        print("| reference: findscu, movescu+storescp, links, dcmmkdir, genisoimage, read | %.2f | 1.00 | %s |"
              % (ref_total, ratio(ref_total, bare_total)))
    elif images > REFERENCE_MAX_IMAGES:
        print("| reference: not run above %d images (dcmmkdir's time grows with the square of the count: "
              "hours) | | | |" % REFERENCE_MAX_IMAGES)
    if bare_total:
        print("| bare C-MOVE: movescu into a quiet storescp, same study | %.2f | %s | 1.00 |"
              % (bare_total, ratio(bare_total)))
    for retrieve, results in mkiso.items():
        total = median([r["total"] for r in results])
        print("| mkiso %s: GET /api/iso/download, all checks | %.2f | **%s** | **%s** |"
              % (retrieve, total, ratio(total), ratio(total, bare_total)))
    if ZIP_ROW in mkiso and "move" in mkiso:
        zip_total, move_total = (median([r["total"] for r in mkiso[row]]) for row in (ZIP_ROW, "move"))
        print("| mkiso ZIP / ISO download of the same study (move) | | **%.2f** | |" % (zip_total / move_total))
    if cached:
        print("| mkiso move, cache on: the first download | %.2f | %s | |" % (cached[0], ratio(cached[0])))
        again = median(cached[1:])
        print("| mkiso move, cache on: the same disc again (C-FINDs, no C-MOVE) | %.2f | %s | |"
              % (again, ratio(again)))
    if peer is not None and "move" in mkiso:
        move_total = median([r["total"] for r in mkiso["move"]])
        print("| peer: Orthanc media export (images already held) | %.2f | %s | (mkiso move / Orthanc: %.2f) |"
              % (peer, ratio(peer), move_total / peer))
    print()
    print("Phase split (median seconds)")
    print()
    if reference:
        print("| reference | " + " | ".join(reference[0]) + " |")
        print("|---|" + "---|" * len(reference[0]))
        print("| | " + " | ".join("%.2f" % median([r[p] for r in reference]) for p in reference[0]) + " |")
        print()
    phases = MKISO_PHASES + ("send",)
    print("| mkiso | " + " | ".join(phases) + " |")
    print("|---|" + "---|" * len(phases))
    for retrieve, results in mkiso.items():
        print("| %s | " % retrieve + " | ".join("%.2f" % median([r.get(p, 0) for r in results]) for p in phases)
              + " |")
    print()
    print("mkiso's iso and send overlap: the answer starts with the ISO's first bytes (send: first to last byte).")
    for retrieve, peak in peaks.items():
        print("mkiso-server peak RSS (VmHWM), %s: %d MB" % (retrieve, peak // 1024))
    if delivery:
        rates = {server: iso_bytes / median(seconds) / 2 ** 20 for server, seconds in delivery.items()}
        print("Delivery of the same cached ISO, alternated (same client, sendfile both): mkiso %.0f MB/s, "
              "nginx %.0f MB/s: mkiso/nginx %.2f" % (rates["mkiso"], rates["nginx"], rates["mkiso"] / rates["nginx"]))
    print(flush=True)

# -- concurrency -----------------------------------------------------------------

def bench_concurrency(jobs, images, image_kb, root, pacs_choice):
    """``jobs`` downloads of ``images`` each, one after the other and then all at once, each on a fresh
    mkiso-server: wall time, the ratio, peak RSS.  No lock or shared step may make them slower at once."""
    receiver_port = demo.free_port()
    studies = [demo.SampleStudy("BENCH-%d" % number, "BENCH^MARK%d" % number, "CONC%d" % number, series=(images,),
                                image_bytes=image_kb * 1024, noise=True) for number in range(1, jobs + 1)]
    print("%d downloads of %d images of %d KB, in a row and at once: generating ..." % (jobs, images, image_kb),
          flush=True)
    pacs = loaded_pacs(root, studies, {"CDRECORD": receiver_port}, pacs_choice)
    walls, peaks = {}, {}
    try:
        for mode in ("in a row", "at once"):
            os.sync()
            server = MkisoServer(root, pacs, receiver_port, "move", name=mode.replace(" ", "-"))
            try:
                print("  %s ..." % mode, flush=True)
                started = time.perf_counter()
                if mode == "in a row":
                    for study in studies:
                        server.download(study.accession)
                else:
                    threads = [threading.Thread(target=server.download, args=(study.accession,)) for study in studies]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                walls[mode] = time.perf_counter() - started
                peaks[mode] = server.peak_kb()
            finally:
                server.stop()
    finally:
        pacs.stop()
    print()
    print("### %d downloads of %d images x %d KB (PACS: %s; limits.max_jobs 4)"
          % (jobs, images, image_kb, type(pacs).__name__))
    print()
    print("| run | wall seconds | ratio | mkiso-server peak RSS |")
    print("|---|---|---|---|")
    for mode in walls:
        print("| %s | %.2f | %.2f | %d MB |" % (mode, walls[mode], walls[mode] / walls["in a row"], peaks[mode] >> 10))
    print(flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000x512,10000x128",
                        help="studies to time, IMAGESxKB each (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="runs per row; the median is shown")
    parser.add_argument("--pacs", choices=("auto", "dcmqrscp", "orthanc"), default="auto",
                        help="auto: dcmqrscp up to %d images, Orthanc above" % DCMQRSCP_MAX_IMAGES)
    parser.add_argument("--concurrency", default="4x2000x64",
                        help="DOWNLOADSxIMAGESxKB at once against in a row, or none (default: %(default)s)")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help="the rows of each study size, of %s (default: all)" % ",".join(ROWS))
    args = parser.parse_args()
    rows = [row for row in args.rows.split(",") if row]
    unknown = set(rows) - set(ROWS)
    if unknown or not set(rows) - {"cache", "peer"}:
        parser.error("--rows: %s; choose from %s" % (", ".join(sorted(unknown)) or "no timed row", ",".join(ROWS)))
    print("staging with %s placement (fastcopy)" % fastcopy.IMPLEMENTATION)
    runs = [(bench_size, size, (args.runs,), {"rows": rows}) for size in args.sizes.split(",") if size]
    if args.concurrency != "none":
        runs.append((bench_concurrency, args.concurrency, (), {}))
    for bench, size, extra, options in runs:
        numbers = [int(part) for part in size.lower().split("x")]
        root = tempfile.mkdtemp(prefix="mkiso-bench-", dir=os.environ.get("MKISO_BENCH_DIR"))
        try:
            bench(*numbers, *extra, root, args.pacs, **options)
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
