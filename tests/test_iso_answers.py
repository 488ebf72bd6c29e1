"""ISO answers over HTTP (SPEC §8): Range and HEAD, and sendfile carrying the bytes."""

import os
import urllib.error
import urllib.request

import pytest

from mkiso.disc import tree
from mkiso.http import application, delivery, waitress_adapter
from discs import check_pdi, open_iso
from conftest import wait_until_clean

SIZE = 1000


@pytest.mark.parametrize("header, wanted", [
    ("bytes=0-99", (0, 99)),
    ("bytes=500-599", (500, 599)),
    ("bytes=990-", (990, 999)),
    ("bytes=-10", (990, 999)),
    ("bytes=-5000", (0, 999)),
    ("bytes=900-5000", (900, 999)),
    ("bytes=999-999", (999, 999)),
    (None, None),
    ("", None),
    ("bytes=-", None),
    ("bytes=5-1", None),
    ("bytes=0-1,5-6", None),
    ("items=0-1", None),
])
def test_range_matrix(header, wanted):
    assert delivery.byte_range(header, SIZE) == wanted


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_unsatisfiable_ranges(header):
    with pytest.raises(delivery.RangeNotSatisfiable) as caught:
        delivery.byte_range(header, SIZE)
    assert caught.value.status == 416
    assert ("Content-Range", "bytes */1000") in caught.value.headers


@pytest.fixture
def server(make_service, live_server):
    service = make_service()
    return service, live_server(application.Application(service.config, service))


def get(url, headers=None, method="GET"):
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_ranges_through_waitress_give_the_same_bytes(server, tmp_path):
    service, base = server
    url = base + "/api/iso/download?accession_number=ACC2001"
    status, headers, whole = get(url)
    assert status == 200 and headers["Accept-Ranges"] == "bytes"
    size = len(whole)
    pieces = {"bytes=0-99": whole[:100], "bytes=70000-70999": whole[70000:71000],
              "bytes=%d-" % (size - 3000): whole[-3000:], "bytes=-2048": whole[-2048:]}
    for header, expected in pieces.items():
        status, headers, body = get(url, {"Range": header})
        assert status == 206, header
        assert body == expected, header
        first, last = (int(v) for v in headers["Content-Range"].split()[1].split("/")[0].split("-"))
        assert headers["Content-Range"] == "bytes %d-%d/%d" % (first, last, size)
        assert int(headers["Content-Length"]) == len(expected) == last - first + 1
    status, headers, body = get(url, {"Range": "bytes=%d-" % size})
    assert status == 416 and headers["Content-Range"] == "bytes */%d" % size
    assert b"range_not_satisfiable" in body
    status, headers, body = get(url, method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == size
    assert wait_until_clean(service) == []


def test_the_iso_leaves_through_sendfile_byte_for_byte(server, archive, tmp_path, monkeypatch):
    """Every byte of every file on the disc went through os.sendfile, from the staged file (the ISO is
    laid out over the staged tree, never written: ``isoimage``); only the ISO's directory and the zeros
    between files went from memory."""
    service, base = server
    calls = []
    real_sendfile = os.sendfile

    def counting_sendfile(out_fd, in_fd, offset, count):
        done = real_sendfile(out_fd, in_fd, offset, count)
        if done > 0:
            calls.append((os.readlink("/proc/self/fd/%d" % in_fd), os.pread(in_fd, done, offset)))
        return done

    monkeypatch.setattr(waitress_adapter.os, "sendfile", counting_sendfile)
    status, headers, body = get(base + "/api/iso/download?accession_number=BIG01")
    assert status == 200 and len(body) == int(headers["Content-Length"]) > 8 * 1024 * 1024
    # The client can finish reading while the server thread is still returning from its last
    # sendfile: compare once the server has closed the body, after that call was counted.
    assert wait_until_clean(service) == []
    assert calls, "sendfile was never called"
    iso_path = tmp_path / "big.iso"
    iso_path.write_bytes(body)
    disc = open_iso(str(iso_path), str(tmp_path / "big"))
    sent = {}
    for source, data in calls:
        assert "/disc-1/" in source and not source.endswith(".iso"), source  # a staged file, no ISO
        sent[source.split("/disc-1/", 1)[1]] = sent.get(source.split("/disc-1/", 1)[1], b"") + data
    on_disc = {path: (tmp_path / "big" / path).read_bytes() for path in disc.files}
    assert sent == {path: data for path, data in on_disc.items() if data}, "some bytes took another path"
    check_pdi(open_iso(str(iso_path), str(tmp_path / "big")), archive.sop_uids("BIG01"))


def test_head_sizes_the_disc_without_writing_it(server, monkeypatch):
    service, base = server

    def no_iso(*args, **kwargs):
        raise AssertionError("HEAD must not write the ISO")

    monkeypatch.setattr(tree, "make_iso", no_iso)
    monkeypatch.setattr(tree, "read_iso", no_iso)  # nor lay it out (``isoimage``)
    url = base + "/api/iso/download?accession_number=ACC2001"
    status, headers, body = get(url, method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    assert headers["Accept-Ranges"] == "bytes"
    assert get(url)[0] == 500  # the patch is live: a GET does lay out the ISO
    assert wait_until_clean(service) == []
