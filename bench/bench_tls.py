"""Benchmark: a disc by C-MOVE and by C-GET over TLS against the same disc in the clear (SPEC §14).

Two Debian Orthancs hold the same study: one in the clear, one speaking
DICOM only over TLS (client certificates required; its C-MOVEs to our
receiver over TLS too).  A real mkiso-server downloads the study's ISO from
each, by C-MOVE and by C-GET; over TLS the C-FINDs use findscu's own +tls
and the retrieve association goes through mkiso's stunnel4 tunnel (dcmtk
3.6.7's movescu and getscu have no +tls), the images of a C-MOVE come to
storescp +tls.  The rows are interleaved, each run after a sync, and each
row's time is the median of --runs runs; the ratio TLS / clear is what
carries across machines (the issue's bound: 1.3).

    .venv/bin/python bench/bench_tls.py [--size 2000x512] [--runs 1]

Needs dcmtk, genisoimage, orthanc, stunnel4 and openssl (Debian packages).
"""

import argparse
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_download import MkisoServer, Orthanc, median, run  # noqa: E402
from mkiso import demo  # noqa: E402


def tls_yaml(pki):
    """The config's tls: mapping with mkiso's certificate, as YAML flow."""
    certificate, key = pki.mkiso
    return "{enabled: true, certificate: %s, private_key: %s, ca_file: %s}" % (certificate, key, pki.ca[0])


def bench(images, image_kb, runs, root):
    pki = demo.Pki(os.path.join(root, "pki"))
    receiver_port = demo.free_port()
    study = demo.SampleStudy("BENCH-1", "BENCH^MARK", "BENCH%d" % images, series=(images,),
                             image_bytes=image_kb * 1024, noise=True)
    print("%d images of %d KB: generating ..." % (images, image_kb), flush=True)
    source = os.path.join(root, "source")
    demo.write_large_study(study, source)
    clear = Orthanc(os.path.join(root, "orthanc-clear"), {"CDRECORD": receiver_port})
    secure = Orthanc(os.path.join(root, "orthanc-tls"), {}, {
        "DicomTlsEnabled": True, "DicomTlsCertificate": pki.pacs[0], "DicomTlsPrivateKey": pki.pacs[1],
        "DicomTlsTrustedCertificates": pki.ca[0], "DicomTlsRemoteCertificateRequired": True,
        "DicomModalities": {"cdrecord": {"AET": "CDRECORD", "Host": "127.0.0.1", "Port": receiver_port,
                                         "UseDicomTls": True}}})
    started = []
    try:
        for pacs in (clear, secure):
            pacs.start()
            started.append(pacs)
        print("  loading both Orthancs ...", flush=True)
        clear.load(source, images)
        run(["storescu", "-aec", secure.ae_title, "+tls", pki.mkiso[1], pki.mkiso[0], "+cf", pki.ca[0],
             "+sd", "+r", "127.0.0.1", str(secure.port), source])
        shutil.rmtree(source)
        rows = [(retrieve, side) for retrieve in ("move", "get") for side in ("clear", "tls")]
        times = {row: [] for row in rows}
        for number in range(1, runs + 1):
            turn = (number - 1) % len(rows)
            order = rows[turn:] + rows[:turn]
            print("  run %d: %s ..." % (number, ", ".join("%s %s" % row for row in order)), flush=True)
            for retrieve, side in order:
                # one server at a time: the C-MOVE rows share the receiver port the PACSes have on file
                server = MkisoServer(root, secure if side == "tls" else clear, receiver_port, retrieve,
                                     name="%s-%s" % (retrieve, side), tls=tls_yaml(pki) if side == "tls" else "{}")
                try:
                    os.sync()
                    times[(retrieve, side)].append(server.download(study.accession))
                finally:
                    server.stop()
    finally:
        for pacs in started:
            pacs.stop()
    report(images, image_kb, runs, times)


def report(images, image_kb, runs, times):
    print()
    print("### DICOM over TLS: %d images x %d KB (Orthanc 1.10.1; medians of %d runs)" % (images, image_kb, runs))
    print()
    print("| retrieve | in the clear (s) | over TLS (s) | TLS / clear | transfer clear / TLS (s) |")
    print("|---|---|---|---|---|")
    for retrieve in ("move", "get"):
        clear, secure = (median([r["total"] for r in times[(retrieve, side)]]) for side in ("clear", "tls"))
        transfer = [median([r.get("transfer", 0) for r in times[(retrieve, side)]]) for side in ("clear", "tls")]
        print("| %s | %.2f | %.2f | **%.2f** | %.2f / %.2f |" % (retrieve, clear, secure, secure / clear, *transfer))
    print(flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2000x512", help="the study, IMAGESxKB (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=1, help="runs per row; the median is shown")
    args = parser.parse_args()
    images, image_kb = (int(part) for part in args.size.lower().split("x"))
    root = tempfile.mkdtemp(prefix="mkiso-bench-tls-", dir=os.environ.get("MKISO_BENCH_DIR"))
    try:
        bench(images, image_kb, args.runs, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
