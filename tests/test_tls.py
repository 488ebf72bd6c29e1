"""DICOM over TLS (SPEC §14) against real peers: Debian's Orthanc with DicomTlsEnabled and client
certificates required (it also sends C-MOVE's images over TLS to our receiver), the plain dcmqrscp
archive as a PACS without TLS, storescp +tls as the publisher, and stunnel4 as the tunnel for the
retrieve tools without +tls.  Certificates are made with openssl in the test (``pki.Pki``)."""

import glob
import logging
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from mkiso import config as configuration, demo, errors, process
from mkiso.dicom import pacs as pacs_module, tls
from mkiso.http import application
from mkiso.service import Service
from conftest import DCMTK_DIR, write_config
from discs import check_pdi, download
from test_print import FakeRimage

STUDY = demo.SampleStudy("PAT-2801", "SECURE^NODE", "TLS01", series=(3, 2))

pytestmark = pytest.mark.skipif(not shutil.which("stunnel4") or not shutil.which("Orthanc"),
                                reason="stunnel4 and orthanc are needed (scripts/setup installs them)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return demo.Pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture(scope="module")
def tls_orthanc(tmp_path_factory, pki, receiver_port):
    """Orthanc speaking DICOM only over TLS, client certificates required and checked against our CA;
    it sends C-MOVE's images to CDRECORD over TLS as well."""
    pacs = demo.Orthanc(str(tmp_path_factory.mktemp("orthanc-tls")), {}, {
        "DicomTlsEnabled": True, "DicomTlsCertificate": pki.pacs[0], "DicomTlsPrivateKey": pki.pacs[1],
        "DicomTlsTrustedCertificates": pki.ca[0], "DicomTlsRemoteCertificateRequired": True,
        "DicomScuTimeout": 5,
        "DicomModalities": {"cdrecord": {"AET": "CDRECORD", "Host": "127.0.0.1", "Port": receiver_port,
                                         "UseDicomTls": True}}})
    pacs.start()
    try:
        assert demo.wait_for_port(int(pacs.http.rsplit(":", 1)[1]), timeout=30), "Orthanc's HTTP port"
        source = tmp_path_factory.mktemp("tls-source")
        for path in demo.write_study(STUDY, str(source)):
            with open(path, "rb") as handle:  # over HTTP: its DICOM port takes TLS only
                request = urllib.request.Request(pacs.http + "/instances", data=handle.read(), method="POST")
            urllib.request.urlopen(request, timeout=30).close()
        yield pacs
    finally:
        pacs.stop()


@pytest.fixture
def secure(settings, pki, tls_orthanc):
    """Settings for the TLS Orthanc: every association TLS with mkiso's certificate."""
    settings["pacs"] = {"ae_title": tls_orthanc.ae_title, "host": "127.0.0.1", "port": tls_orthanc.port,
                        "tls": pki.setting()}
    settings["receiver"]["tls"] = pki.setting()
    settings["timeouts"]["move_s"] = 30
    return settings


def app_of(service):
    return application.Application(service.config, service)


def health(wsgi_call, service):
    service.health._expensive = None
    return wsgi_call(app_of(service), "/api/health", query="strict=1").json()


# -- the configuration -----------------------------------------------------------------------------

def load(tmp_path, settings):
    return configuration.load(write_config(tmp_path / "config.yaml", settings))


@pytest.mark.parametrize("tls_value, message", [
    ({"enable": True}, "unknown key pacs.tls.enable"),
    ({"enabled": "yes"}, "pacs.tls.enabled must be true or false"),
    ({"enabled": True, "profile": "tls1.0"}, "pacs.tls.profile must be one of: bcp195-nd, bcp195, bcp195-ex"),
    ({"enabled": True}, "pacs.tls.certificate must name a PEM file when pacs.tls.enabled is true"),
    ("on", "pacs.tls must be a mapping"),
])
def test_a_tls_setting_that_is_wrong_names_its_key(tmp_path, settings, tls_value, message):
    settings["pacs"]["tls"] = tls_value
    with pytest.raises(configuration.ConfigError, match=message.replace(".", r"\.")):
        load(tmp_path, settings)


def test_the_ca_file_is_needed_unless_verify_peer_is_off(tmp_path, settings, pki):
    settings["receiver"]["tls"] = dict(pki.setting(), ca_file="")
    with pytest.raises(configuration.ConfigError, match=r"receiver\.tls\.ca_file must name a PEM file"):
        load(tmp_path, settings)
    settings["receiver"]["tls"]["verify_peer"] = False
    assert load(tmp_path, settings).receiver.tls.ca_file == ""


def test_the_defaults_are_off_and_bcp195_non_downgrading(tmp_path, settings):
    config = load(tmp_path, settings)
    for section in (config.pacs, config.receiver, config.publisher):
        assert vars(section.tls) == {"enabled": False, "certificate": "", "private_key": "", "ca_file": "",
                                     "verify_peer": True, "profile": "bcp195-nd"}


@pytest.mark.parametrize("change, message", [
    (lambda pki: {"private_key": pki.pacs[1]}, "pacs.tls: private_key {pacs_key} does not match certificate "
                                               "{mkiso_crt}"),
    (lambda pki: {"private_key": pki.path("missing.key")}, "pacs.tls: private_key {missing} cannot be read: "
                                                           "No such file or directory"),
    (lambda pki: {"ca_file": pki.mkiso[1]}, "pacs.tls: ca_file {mkiso_key} holds no PEM certificate"),
])
def test_check_config_names_the_file_and_never_prints_a_key(tmp_path, settings, pki, change, message):
    settings["pacs"]["tls"] = dict(pki.setting(), **change(pki))
    config = load(tmp_path, settings)
    with pytest.raises(configuration.ConfigError) as caught:
        configuration.check_system(config)
    said = str(caught.value)
    assert message.format(pacs_key=pki.pacs[1], mkiso_crt=pki.mkiso[0], missing=pki.path("missing.key"),
                          mkiso_key=pki.mkiso[1]) in said
    with open(pki.mkiso[1], encoding="ascii") as handle:
        key_lines = [line for line in handle.read().splitlines() if "-----" not in line]
    assert not any(line in said for line in key_lines)


def test_a_good_tls_setting_passes_check_config(tmp_path, settings, pki):
    settings["pacs"]["tls"] = pki.setting()
    configuration.check_system(load(tmp_path, settings))


# -- discs over TLS ----------------------------------------------------------------------------------

@pytest.mark.parametrize("retrieve", ["move", "get"])
def test_a_disc_over_tls_is_exact(secure, make_service, wsgi_call, tmp_path, retrieve, caplog):
    """dcmtk 3.6.7's movescu and getscu have no +tls: the retrieve goes through the tunnel (stunnel4);
    Orthanc refuses anything in the clear, so a disc that comes came over TLS."""
    assert not tls.native(os.path.join(DCMTK_DIR, "movescu" if retrieve == "move" else "getscu"))
    service = make_service(pacs={"retrieve": retrieve})
    with caplog.at_level(logging.WARNING):
        _, disc, _ = download(wsgi_call, app_of(service), "/api/iso/download", tmp_path, "accession_number=TLS01")
    check_pdi(disc, set(STUDY.sop_uids))
    assert os.path.exists(service.pacs.tunnel.config_path)  # it went through the tunnel
    assert not [proc for proc in process._live if proc.owner is not None], "a job's tool still runs"
    assert not [record for record in caplog.records if "refused" in record.getMessage()]
    report = health(wsgi_call, service)
    checks = report["checks"]
    assert report["status"] == "ok", report
    assert checks["pacs"]["ok"] is True and "C-ECHO over TLS" in checks["pacs"]["detail"], checks["pacs"]


# -- health and /metrics ---------------------------------------------------------------------------

def days_left(wsgi_call, service):
    text = wsgi_call(app_of(service), "/metrics").body.decode("utf-8")
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("mkiso_tls_certificate_days_left{")}


def test_health_shows_each_certificates_days_left(secure, make_service, wsgi_call, pki):
    service = make_service()
    check = health(wsgi_call, service)["checks"]["tls"]
    assert check == {"ok": True, "state": "ok", "detail": (
        "pacs.tls: %s expires in 399 days (%s); receiver.tls: %s expires in 399 days (%s)"
        % (pki.mkiso[0], check["detail"][-11:-1], pki.mkiso[0], check["detail"][-11:-1]))}, check
    days = days_left(wsgi_call, service)
    assert set(days) == {"pacs.tls", "receiver.tls"} and all(399 < left <= 400 for left in days.values()), days


def test_a_certificate_expiring_within_30_days_degrades_health(secure, make_service, wsgi_call, pki):
    secure["receiver"]["tls"]["certificate"] = pki.soon[0]
    service = make_service()
    report = health(wsgi_call, service)
    check = report["checks"]["tls"]
    assert report["status"] == "degraded" and check["ok"] is False and check["state"] == "degraded", check
    assert "receiver.tls: %s expires in 9 days" % pki.soon[0] in check["detail"] and "renew it" in check["detail"]
    assert 9 < days_left(wsgi_call, service)["receiver.tls"] <= 10


def test_an_expired_certificate_fails_the_check(secure, make_service, wsgi_call, pki):
    secure["receiver"]["tls"]["certificate"] = pki.expired[0]
    service = make_service()
    check = health(wsgi_call, service)["checks"]["tls"]
    assert check["ok"] is False and check["state"] == "failed", check
    assert "receiver.tls: mkiso's certificate %s expired on " % pki.expired[0] in check["detail"]
    assert days_left(wsgi_call, service)["receiver.tls"] < 0


def test_verify_peer_off_is_logged_at_start_and_shown_in_health(secure, make_service, wsgi_call, caplog):
    secure["pacs"]["tls"]["verify_peer"] = False
    with caplog.at_level(logging.WARNING):
        service = make_service()
    assert [r for r in caplog.records if "pacs.tls.verify_peer is false" in r.getMessage()]
    check = health(wsgi_call, service)["checks"]["tls"]
    assert check["state"] == "degraded" and "pacs.tls.verify_peer is false" in check["detail"], check


def test_plain_associations_reach_nothing_at_the_tls_orthanc(tls_orthanc):
    """The test PACS really refuses the clear: else the disc above would prove nothing."""
    result = subprocess.run([os.path.join(DCMTK_DIR, "echoscu"), "-aec", "ORTHANC", "127.0.0.1",
                             str(tls_orthanc.port)], capture_output=True, text=True)
    assert result.returncode != 0


# -- what goes wrong, each said --------------------------------------------------------------------

def failed_download(wsgi_call, service, code):
    response = wsgi_call(app_of(service), "/api/iso/download", query="accession_number=TLS01")
    body = response.json()
    assert response.status == 502 and body["code"] == code, body
    return body["error"]


def retrieve_failure(config, retrieve, study_uid, tmp_path):
    """The error of the retrieve association alone (C-MOVE or C-GET of ``study_uid``): through the tunnel."""
    pacs = pacs_module.Pacs(config)
    with pytest.raises(errors.UpstreamFailed) as caught:
        if retrieve == "move":
            pacs.move_study(study_uid)
        else:
            out = tmp_path / "got"
            out.mkdir()
            pacs.get_study(study_uid, str(out))
    return caught.value


def test_a_pacs_without_tls(settings, make_service, wsgi_call, pki, archive):
    """The plain dcmqrscp archive with pacs.tls on: findscu's TLS handshake meets DICOM."""
    settings["pacs"]["tls"] = pki.setting()
    service = make_service()
    error = failed_download(wsgi_call, service, "tls_failed")
    assert "does not speak TLS on this port" in error and "PACS ABPACS@127.0.0.1:%d" % archive.pacs.port in error


@pytest.mark.parametrize("retrieve", ["move", "get"])
def test_a_pacs_without_tls_through_the_tunnel(settings, pki, archive, tmp_path, retrieve):
    """The retrieve association alone (through stunnel) says it too."""
    settings["pacs"]["tls"] = pki.setting()
    error = retrieve_failure(load(tmp_path, settings), retrieve, archive.by_accession("ACC2001")[0].study_uid,
                             tmp_path)
    assert error.code == "tls_failed" and "does not speak TLS on this port" in error.message


@pytest.mark.parametrize("retrieve", ["move", "get"])
def test_a_tls_pacs_that_is_down_through_the_tunnel(secure, tmp_path, retrieve):
    """Not taken for a certificate refused: the tunnel says it could not connect."""
    secure["pacs"]["port"] = demo.free_port()
    error = retrieve_failure(load(tmp_path, secure), retrieve, STUDY.study_uid, tmp_path)
    said = ("the TLS tunnel (stunnel) could not reach the PACS ORTHANC@127.0.0.1:%d: s_connect: connect "
            "127.0.0.1:%d: Connection refused" % ((secure["pacs"]["port"],) * 2))
    assert said in error.message, error.message
    assert "certificate" not in error.message


@pytest.mark.parametrize("retrieve", ["move", "get"])
def test_a_key_file_gone_since_the_start_through_the_tunnel(secure, tmp_path, pki, retrieve):
    key = tmp_path / "gone.key"
    shutil.copy(pki.mkiso[1], key)
    secure["pacs"]["tls"]["private_key"] = str(key)
    config = load(tmp_path, secure)
    configuration.check_system(config)
    key.unlink()
    error = retrieve_failure(config, retrieve, STUDY.study_uid, tmp_path)
    assert "the TLS tunnel (stunnel) to the PACS ORTHANC@127.0.0.1:%d could not start: %s: No such file or " \
           "directory (2)" % (secure["pacs"]["port"], key) in error.message, error.message


def test_a_pacs_certificate_our_ca_did_not_issue(secure, make_service, wsgi_call, pki):
    secure["pacs"]["tls"]["ca_file"] = pki.other_ca[0]
    service = make_service()
    error = failed_download(wsgi_call, service, "tls_failed")
    assert "the certificate of the PACS ORTHANC@" in error and "is not trusted" in error
    assert "does not chain to a CA in %s" % pki.other_ca[0] in error
    check = health(wsgi_call, service)["checks"]["pacs"]
    assert check["ok"] is False and "is not trusted" in check["detail"]


@pytest.mark.parametrize("retrieve", ["move", "get"])
def test_a_pacs_certificate_our_ca_did_not_issue_through_the_tunnel(secure, pki, tmp_path, retrieve):
    secure["pacs"]["tls"]["ca_file"] = pki.other_ca[0]
    error = retrieve_failure(load(tmp_path, secure), retrieve, STUDY.study_uid, tmp_path)
    assert error.code == "tls_failed", error.message
    assert "is not trusted (CN=mkiso test CA)" in error.message, error.message


def test_a_pacs_that_does_not_trust_our_certificate(secure, make_service, wsgi_call, pki):
    """Our certificate from a CA the PACS does not trust (Orthanc checks client certificates)."""
    secure["pacs"]["tls"].update(certificate=pki.stranger[0], private_key=pki.stranger[1])
    service = make_service()
    error = failed_download(wsgi_call, service, "tls_failed")
    assert "refused mkiso's certificate %s" % pki.stranger[0] in error, error
    assert "the peer must trust the CA that issued it" in error


@pytest.mark.parametrize("retrieve", ["move", "get"])
def test_a_pacs_that_does_not_trust_our_certificate_through_the_tunnel(secure, pki, tmp_path, retrieve):
    secure["pacs"]["tls"].update(certificate=pki.stranger[0], private_key=pki.stranger[1])
    error = retrieve_failure(load(tmp_path, secure), retrieve, STUDY.study_uid, tmp_path)
    assert error.code == "tls_failed", error.message
    assert "refused mkiso's certificate %s" % pki.stranger[0] in error.message, error.message


def test_our_expired_certificate(secure, make_service, wsgi_call, pki):
    secure["pacs"]["tls"]["certificate"] = pki.expired[0]
    service = make_service()
    error = failed_download(wsgi_call, service, "tls_certificate_invalid")
    assert error.startswith("mkiso's certificate %s expired on " % pki.expired[0]), error
    check = health(wsgi_call, service)["checks"]["pacs"]
    assert check["ok"] is False and "expired on" in check["detail"]


def test_a_plain_store_to_the_tls_receiver_is_refused_and_logged(secure, make_service, tmp_path, caplog,
                                                                  wsgi_call):
    service = make_service()
    source = tmp_path / "plain"
    paths = demo.write_study(demo.SampleStudy("PAT-2802", "PLAIN^SENDER", "PLAIN1", series=(1,)), str(source))
    with caplog.at_level(logging.WARNING):
        result = subprocess.run([os.path.join(DCMTK_DIR, "storescu"), "-aec", "CDRECORD", "127.0.0.1",
                                 str(service.config.receiver.port)] + paths, capture_output=True, text=True)
        assert "Association Rejected" in result.stdout + result.stderr, result
        deadline = time.monotonic() + 5
        while service.receiver.plain_refused == 0 or not [
                r for r in caplog.records if "in the clear refused" in r.getMessage()]:
            assert time.monotonic() < deadline, "not refused and logged"
            time.sleep(0.1)
    assert service.receiver.plain_refused == 1
    assert os.listdir(service.receiver.inbox) == []
    check = health(wsgi_call, service)["checks"]["receiver"]
    assert "as CDRECORD, TLS only (1 associations in the clear refused)" in check["detail"], check


def test_a_tls_store_with_a_certificate_of_another_ca_gets_nothing_in(secure, make_service, tmp_path, pki):
    service = make_service()
    source = tmp_path / "stranger"
    paths = demo.write_study(demo.SampleStudy("PAT-2803", "STRANGE^SENDER", "STR1", series=(1,)), str(source))
    result = subprocess.run([os.path.join(DCMTK_DIR, "storescu"), "-aec", "CDRECORD", "+tls", pki.stranger[1],
                             pki.stranger[0], "-ic", "127.0.0.1", str(service.config.receiver.port)] + paths,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert glob.glob(os.path.join(service.receiver.inbox, "**", "*.*"), recursive=True) == []


# -- the tunnel is not a door ------------------------------------------------------------------------

def as_nobody(args):
    """``args`` run as the user nobody (setpriv, as root; skipped where the test is not root)."""
    if os.geteuid() != 0:
        pytest.skip("running a tool as another user needs root")
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"] + args,
                          capture_output=True, text=True, timeout=60)


def test_another_user_on_the_tunnel_is_refused(secure, tmp_path, caplog):
    """While a retrieve's tunnel is open, the service's own C-ECHO through it reaches the TLS PACS;
    the same C-ECHO as user nobody is closed unserved and logged."""
    pacs = pacs_module.Pacs(load(tmp_path, secure))
    echo = [os.path.join(DCMTK_DIR, "echoscu"), "-aec", "ORTHANC", "-to", "10", "127.0.0.1"]
    with caplog.at_level(logging.WARNING), pacs.tunnel.open() as session:
        ours = subprocess.run(echo + [str(session.port)], capture_output=True, text=True, timeout=60)
        theirs = as_nobody(echo + [str(session.port)])
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert theirs.returncode != 0 and "Association Request Failed" in theirs.stdout + theirs.stderr
    assert pacs.tunnel.refused == 1
    [logged] = [r.getMessage() for r in caplog.records if "refused a connection of uid" in r.getMessage()]
    assert "uid 65534" in logged


# -- the publisher ---------------------------------------------------------------------------------

def test_print_over_tls(secure, make_service, wsgi_call, tmp_path, pki):
    """storescu +tls to a storescp +tls playing the publisher: every image arrives."""
    rimage = FakeRimage(str(tmp_path / "rimage"), "+tls", pki.pacs[1], pki.pacs[0], "+cf", pki.ca[0], "-rc")
    try:
        service = make_service(publisher={"host": "127.0.0.1", "port": rimage.port, "tls": pki.setting()})
        response = wsgi_call(app_of(service), "/api/iso/print", query="accession_number=TLS01")
        assert response.status == 200, response.body
        assert rimage.received_sop_uids() == set(STUDY.sop_uids)
        assert health(wsgi_call, service)["checks"]["publisher"]["ok"] is True
    finally:
        rimage.stop()


def test_print_in_the_clear_to_a_tls_publisher_fails(secure, make_service, wsgi_call, tmp_path, pki):
    rimage = FakeRimage(str(tmp_path / "rimage"), "+tls", pki.pacs[1], pki.pacs[0], "+cf", pki.ca[0], "-rc")
    try:
        service = make_service(publisher={"host": "127.0.0.1", "port": rimage.port})
        response = wsgi_call(app_of(service), "/api/iso/print", query="accession_number=TLS01")
        assert response.status == 502 and response.json()["code"] == "publisher_failed", response.body
        assert rimage.received_sop_uids() == set()
    finally:
        rimage.stop()


def test_the_stunnel_configuration_holds_no_key_and_goes_with_the_service(secure, tmp_path, pki):
    service = Service(load(tmp_path, secure))
    service.start()
    try:
        tunnel = service.pacs.tunnel
        with tunnel.open():
            pass
        with open(tunnel.config_path, encoding="utf-8") as handle:
            text = handle.read()
        assert "key = %s" % pki.mkiso[1] in text and "PRIVATE KEY" not in text
        assert os.stat(tunnel.config_path).st_mode & 0o077 == 0
    finally:
        service.stop()
    assert not os.path.exists(tunnel.config_path)
