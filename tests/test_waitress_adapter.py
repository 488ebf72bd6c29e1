"""What mkiso uses of waitress beyond its public API is there, in the waitress installed here.

This file runs in both suites: on PyPI's waitress 3.x and on Debian 12's
python3-waitress 2.1, the one the .deb runs on.  A waitress release that
moved a name is caught here, and at start-up mkiso then keeps waitress's
stock channel, with a warning, and still sends every ISO.
"""

import logging
import os
import time
import urllib.request

import pytest
from waitress.channel import HTTPChannel
from waitress.server import create_server

from mkiso import server as mkiso_server
from mkiso.disc import tree
from mkiso.http import application, delivery, waitress_adapter
from mkiso.jobs import State
from discs import check_pdi, open_iso


def stock_server():
    return create_server(lambda environ, start_response: [], host="127.0.0.1", port=0, map={})


def test_every_name_the_adapter_uses_is_in_this_waitress():
    server = stock_server()
    try:
        assert waitress_adapter.missing(server) == []
    finally:
        server.close()


def test_a_name_gone_from_waitress_is_reported(monkeypatch):
    """The check looks at waitress's own objects, not at mkiso's subclass (which defines the names it
    overrides, whatever waitress does)."""
    monkeypatch.delattr(HTTPChannel, "_flush_some")
    server = stock_server()
    try:
        assert waitress_adapter.missing(server) == ["HTTPChannel._flush_some"]
    finally:
        server.close()


def test_adapted_server_sends_through_sendfile_with_its_own_pools():
    server, _ = mkiso_server.listen(lambda environ, start_response: [], "127.0.0.1", 0, 2)
    try:
        assert server.channel_class is waitress_adapter.SendfileChannel
        assert isinstance(server.task_dispatcher, waitress_adapter.Pools)
    finally:
        server.task_dispatcher.shutdown()
        server.close()


def as_if_a_name_were_gone(monkeypatch):
    """As if a waitress release had renamed a channel attribute."""
    monkeypatch.setattr(waitress_adapter, "CHANNEL_NAMES", waitress_adapter.CHANNEL_NAMES + ("_renamed_later",))
    monkeypatch.setattr(waitress_adapter.os, "sendfile", None)  # the stock channel never calls it


@pytest.mark.parametrize("size", [3 * delivery.BLOCK + 123, 24 * delivery.BLOCK + 123])
def test_without_a_name_mkiso_keeps_the_stock_channel_and_still_sends_the_iso(monkeypatch, caplog, live_server,
                                                                            tmp_path, size):
    """A warning names what is missing, waitress's own channel and pool serve, and an ISO answer still
    arrives whole (larger than one send too: waitress's buffer reads ahead and seeks back) and its files
    go when it ends."""
    as_if_a_name_were_gone(monkeypatch)
    folder = tmp_path / "job"
    folder.mkdir()
    data = os.urandom(size)
    (folder / "disc.iso").write_bytes(data)
    served = []

    def app(environ, start_response):
        iso = tree.Iso(str(folder / "disc.iso"), len(data), "ACC1", "ACC1", str(folder))
        response = delivery.iso_response(environ, iso)
        served.append(response.closer)
        start_response("200 OK", response.headers)
        return response.body

    caplog.set_level(logging.WARNING, logger="mkiso.http.waitress_adapter")
    base = live_server(app)
    assert [r.getMessage() for r in caplog.records if "_renamed_later" in r.getMessage()], caplog.text
    with urllib.request.urlopen(base + "/disc.iso", timeout=30) as answer:
        assert answer.read() == data
    assert len(served) == 1
    deadline = time.monotonic() + 10
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not folder.exists(), "the ISO's folder was not removed when its answer ended"


def test_without_the_sendfile_channel_a_download_is_written_whole_before_it_is_sent(monkeypatch, live_server,
                                                                                   make_service, archive, tmp_path):
    """The stock channel would wait for genisoimage's bytes in waitress's loop thread, stalling every
    connection: so the disc is not streamed there, and arrives exact."""
    as_if_a_name_were_gone(monkeypatch)
    service = make_service()
    base = live_server(application.Application(service.config, service))
    iso = tmp_path / "disc.iso"
    with urllib.request.urlopen(base + "/api/iso/download?accession_number=ACC2001", timeout=60) as answer:
        iso.write_bytes(answer.read())
    check_pdi(open_iso(str(iso), str(tmp_path / "disc")), archive.sop_uids("ACC2001"))
    [job] = service.jobs.recent()
    assert job.stream is False and job.state is State.DONE
