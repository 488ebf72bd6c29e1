"""DICOM over TLS (SPEC §14): dcmtk's own TLS where the tool has it, a tunnel where it has not.

``pacs.tls``, ``receiver.tls`` and ``publisher.tls`` each say whether the
associations of that peer are TLS, with our certificate and key, the CA the
peer's certificate must chain to, and the profile (BCP 195 non-downgrading
by default, dcmtk's ``+py``).  One function makes dcmtk's arguments of a
setting (``dcmtk_args``), so every tool that speaks TLS gets the same ones.

dcmtk 3.6.7 (Debian 12) has ``+tls`` in echoscu, findscu, storescu and
storescp, not in movescu or getscu.  Whether a tool has it is read from the
tool's own ``--help`` (``native``), never guessed from a version number.  A
retrieve tool without it connects in the clear to a ``Tunnel``: a port on
127.0.0.1 that exists only while that one retrieve runs, each connection of
which gets its own ``stunnel4`` (inetd mode: the connection is its stdin and
stdout) that speaks TLS to the PACS with our certificate.  Such a port is a
door to the PACS with mkiso's certificate for anyone on the box who can
connect to it, so a connection is served only when the socket at the other
end belongs to the service's own uid, as the kernel lists it in
/proc/net/tcp; any other is closed unserved and logged.

What went wrong is said in words a person can act on (``failure``): the peer
does not speak TLS, its certificate is not trusted by our CA file, ours has
expired (checked before each association, ``check_certificate``).
"""

import dataclasses
import logging
import os
import re
import selectors
import socket
import ssl
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

from .. import errors, process

log = logging.getLogger(__name__)

# profile -> dcmtk's option, stunnel's TLS 1.2 ciphers (TLS 1.3's are all of BCP 195's)
PROFILES = {
    "bcp195-nd": ("+py", "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:DHE-RSA-AES128-GCM-SHA256:"
                         "DHE-RSA-AES256-GCM-SHA384"),
    "bcp195": ("+px", "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:DHE-RSA-AES128-GCM-SHA256:"
                      "DHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA384:"
                      "DHE-RSA-AES128-SHA256:DHE-RSA-AES256-SHA256"),
    "bcp195-ex": ("+pz", "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES256-GCM-SHA384"),
}
# The largest PDU we take over TLS (dcmtk's -pdu; its default is 16 KB): a 16 KB PDU and its header
# make a full TLS record and a 6-byte one, and every PDU costs the sender one SSL_write and us its
# reads; 128 KB PDUs fill the records (measured: bench/bench_tls.py).
PDU_ARGS = ["-pdu", "131072"]
PROBE_TIMEOUT_S = 10
TUNNEL_END_S = 5  # for a tunnel's stunnel to end once the retrieve tool has closed its side
ACCEPT_TICK_S = 0.1
TCP_ESTABLISHED = "01"
EXPIRY_WARNING_DAYS = 30


@dataclasses.dataclass(frozen=True)
class Certificate:
    """A certificate's validity (``openssl x509``)."""

    path: str
    not_before: float  # seconds since the epoch
    not_after: float

    def days_left(self, now=None):
        return (self.not_after - (time.time() if now is None else now)) / 86400

    def problem(self, now=None):
        """Why the certificate cannot be used now ("" when it can)."""
        now = time.time() if now is None else now
        if now >= self.not_after:
            return "mkiso's certificate %s expired on %s: renew it" % (self.path, _date(self.not_after))
        if now < self.not_before:
            return "mkiso's certificate %s is not valid before %s (the clock, or a certificate issued too early)" % (
                self.path, _date(self.not_before))
        return ""


def _date(seconds):
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))


OPENSSL = "/usr/bin/openssl"


def read_certificate(path):
    """The validity of the PEM certificate at ``path`` (Python's ssl cannot read a certificate's dates);
    ValueError naming the file when it is not one."""
    try:
        result = process.run([OPENSSL, "x509", "-noout", "-startdate", "-enddate", "-in", path], PROBE_TIMEOUT_S)
    except (process.ToolMissing, process.ToolTimeout) as exc:
        raise ValueError("cannot read the dates of %s: %s" % (path, exc))
    dates = dict(line.split("=", 1) for line in result.output.splitlines() if "=" in line)
    try:
        return Certificate(path, ssl.cert_time_to_seconds(dates["notBefore"]),
                           ssl.cert_time_to_seconds(dates["notAfter"]))
    except (KeyError, ValueError):
        raise ValueError("%s is not a PEM certificate" % path)


class CertificateFile:
    """Our certificate as its file is now: read again when the file changed (dcmtk and stunnel read it at
    each association, so a renewed certificate counts at once, here too)."""

    def __init__(self, path):
        self.path = path
        self._seen = None  # (inode, size, mtime) of the file last read
        self._read = (None, "")  # (Certificate, why it could not be read)
        self._lock = threading.Lock()

    def current(self):
        """(the Certificate or None, why it cannot be read or "")."""
        try:
            info = os.stat(self.path)
            seen = (info.st_ino, info.st_size, info.st_mtime_ns)
        except OSError as exc:
            return None, "mkiso's certificate %s cannot be read: %s" % (self.path, exc.strerror)
        with self._lock:
            if seen != self._seen:
                try:
                    self._read = (read_certificate(self.path), "")
                except ValueError as exc:
                    self._read = (None, "mkiso's certificate: %s" % exc)
                self._seen = seen
            return self._read

    def problem(self):
        """Why the certificate cannot be used now, "" when it can."""
        certificate, unreadable = self.current()
        return unreadable or certificate.problem()


def check_files(setting):
    """The sentence for what is wrong with a TLS setting's files, else "": each readable, the key matching
    the certificate, the CA file holding certificates.  Never shows a key: only the files' names."""
    for key, path in (("certificate", setting.certificate), ("private_key", setting.private_key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            return "%s %s cannot be read: %s" % (key, path, exc.strerror)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(setting.certificate, setting.private_key, password=_no_password)
    except (ssl.SSLError, ValueError, TypeError) as exc:
        if "key values mismatch" in str(exc):
            return "private_key %s does not match certificate %s" % (setting.private_key, setting.certificate)
        return ("certificate %s and private_key %s are not a PEM certificate and an unencrypted PEM key (%s)"
                % (setting.certificate, setting.private_key, getattr(exc, "reason", None) or "unreadable"))
    return check_ca_file(setting.ca_file) if setting.ca_file else ""


def check_ca_file(path):
    """The sentence for a CA file that cannot be read or holds no PEM certificate, else ""."""
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:  # an OSError too: first
        return "ca_file %s holds no PEM certificate (%s)" % (path, exc.reason or exc)
    except OSError as exc:
        return "ca_file %s cannot be read: %s" % (path, exc.strerror)
    return ""


def _no_password():
    raise ValueError("the key is encrypted")


def dcmtk_args(setting):
    """dcmtk's options for TLS as ``setting`` says ([] when it is off); the same for an SCU and storescp:
    the peer's certificate is required and checked against ca_file unless verify_peer is false."""
    if setting is None or not setting.enabled:
        return []
    args = ["+tls", setting.private_key, setting.certificate, "-pw", PROFILES[setting.profile][0]]
    if setting.ca_file:
        args += ["+cf", setting.ca_file]
    return args + (["-rc"] if setting.verify_peer else ["-ic"]) + PDU_ARGS


_native = {}


def native(tool):
    """Whether the dcmtk ``tool`` (a path) has ``+tls``, as its own --help says; asked once per path."""
    if tool not in _native:
        try:
            result = process.run([tool, "--help"], PROBE_TIMEOUT_S)
        except (process.ToolMissing, process.ToolTimeout):
            return False  # not remembered: the tool's own error comes when it is run
        _native[tool] = re.search(r"^\s*\+tls\s", result.output, re.M) is not None
    return _native[tool]


# What dcmtk and stunnel say, and what it means for a person.
_NOT_TLS = ("wrong version number", "unexpected eof", "packet length too long", "record layer failure",
            "SSL_connect: Peer suddenly disconnected", "SSL_connect: Connection reset by peer",
            "unexpected message", "http request", "SSL_ERROR_SYSCALL")
_UNTRUSTED = ("certificate verify failed", "Rejected by CERT")
_THEY_REFUSED_US = ("alert certificate expired", "alert bad certificate", "alert unknown ca",
                    "alert certificate unknown", "alert handshake failure", "alert certificate required",
                    # TLS 1.3: the client's handshake is done before the server checks its certificate,
                    # so the server's alert may be missed: dcmtk, or stunnel, sees it hang up on the
                    # A-ASSOCIATE-RQ
                    "connection reset by peer) occurred in routine: sendassociationrqtcp",
                    "tls socket closed (ssl_write) with")


# dcmtk's "Peer aborted Association": over TLS before an A-ASSOCIATE-AC, the peer's alert read as an abort.
_ABORTED = "0006:0317"
_SPOKE_TLS = "Certificate accepted at depth=0"  # stunnel (debug 5), once the peer's certificate passed


def failure(output, setting, peer):
    """The sentence for a TLS association to ``peer`` that failed with ``output`` (the tool's, or the
    tunnel's), or "" when nothing in it is about TLS."""
    low = output.lower()
    broken = [line[3:].strip() for line in output.splitlines() if line.startswith("[!]")]
    if broken:  # stunnel's own configuration, e.g. a key file gone since the start
        return "the TLS tunnel (stunnel) to the %s could not start: %s" % (peer, "; ".join(broken))
    unreachable = re.search(r"LOG3\[\d+\]: (s_connect: .*)", output)  # an error, not the notice "connected"
    if unreachable:
        return "the TLS tunnel (stunnel) could not reach the %s: %s" % (peer, unreachable.group(1).strip())
    if "TCP Initialization Error" in output:  # not reached: not about TLS
        return ""
    if any(sign.lower() in low for sign in _UNTRUSTED):
        rejected = re.search(r"Rejected by CERT at depth=\d+: (.*)", output)
        issuer = " (%s)" % rejected.group(1).strip() if rejected else ""
        return ("the certificate of the %s is not trusted%s: it does not chain to a CA in %s"
                % (peer, issuer, setting.ca_file))
    said = next((sign.replace("alert ", "alert: ") if "alert" in sign else "it hung up after the TLS handshake"
                 for sign in _THEY_REFUSED_US if sign in low), None)
    # stunnel checked the peer's certificate: the peer speaks TLS, whatever broke the connection after
    spoke = _SPOKE_TLS in output
    if said is None and "Association Accepted" not in output and (spoke or _ABORTED in output and not any(
            sign.lower() in low for sign in _NOT_TLS)):
        said = "it ended the connection after the TLS handshake, before accepting the association"
    if said is not None:
        return ("the %s refused mkiso's certificate %s (%s): the peer must trust the CA that issued it"
                % (peer, setting.certificate, said))
    if any(sign.lower() in low for sign in _NOT_TLS):
        return "the %s does not speak TLS on this port (or ended the TLS handshake): is TLS on there?" % peer
    return ""


def check_certificate(certificate):
    """Raise the 502 ``tls_certificate_invalid`` when our certificate (a CertificateFile, None for no TLS)
    cannot be used now."""
    problem = certificate.problem() if certificate is not None else ""
    if problem:
        raise errors.UpstreamFailed("%s; nothing was retrieved or sent." % problem, code="tls_certificate_invalid")


# -- the tunnel for tools without +tls -------------------------------------------------------------

def stunnel_config(host, port, setting):
    """stunnel's configuration for one connection in inetd mode (no ``accept``): TLS to host:port with
    our certificate, the PACS's checked against ca_file, the profile's protocol versions and ciphers.
    Its log goes to its stderr (``foreground``), which the tunnel reads; notices too (``debug = 5``): that
    it accepted the peer's certificate tells a refusal of ours from a peer without TLS."""
    lines = [
        "foreground = yes", "syslog = no", "pid =", "debug = 5", "client = yes",
        "connect = %s:%d" % (host, port), "cert = %s" % setting.certificate, "key = %s" % setting.private_key,
        "sslVersionMin = TLSv1.2", "ciphers = %s" % PROFILES[setting.profile][1],
        "TIMEOUTidle = 43200", "socket = r:TCP_NODELAY=1", "socket = l:TCP_NODELAY=1",
    ]
    if setting.ca_file:
        lines.append("CAfile = %s" % setting.ca_file)
    lines.append("verifyChain = %s" % ("yes" if setting.verify_peer else "no"))
    return "".join(line + "\n" for line in lines)


def socket_owner(conn):
    """The uid owning the socket at the other end of the loopback connection ``conn``, from the
    kernel's table of TCP sockets (/proc/self/net/tcp: /proc/net is hidden by ProcSubset=pid);
    None when it is not listed (gone already)."""
    here = _proc_address(*conn.getsockname())
    there = _proc_address(*conn.getpeername())
    try:
        with open("/proc/self/net/tcp", encoding="ascii") as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                if fields[1] == there and fields[2] == here and fields[3] == TCP_ESTABLISHED:
                    return int(fields[7])
    except OSError:
        return None
    return None


def _proc_address(host, port):
    """An IPv4 address as /proc/net/tcp writes it: the address's bytes in host order, hex; the port hex."""
    packed = socket.inet_aton(host)
    return "%08X:%04X" % (int.from_bytes(packed, sys.byteorder), port)


class Tunnel:
    """The way to a TLS peer for a tool without ``+tls``: see the module's docstring."""

    def __init__(self, host, port, setting, stunnel, config_path):
        self.host = host
        self.port = port
        self.setting = setting
        self.stunnel = stunnel
        self.config_path = config_path
        self.refused = 0  # connections of other users closed unserved
        self._written = False
        self._lock = threading.Lock()

    def _write_config(self):
        with self._lock:
            if not self._written:
                descriptor = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                    handle.write(stunnel_config(self.host, self.port, self.setting))
                self._written = True

    def remove_config(self):
        """At shutdown: stunnel's configuration goes with the service (it is written again when needed)."""
        with self._lock:
            try:
                os.unlink(self.config_path)
            except FileNotFoundError:
                pass
            self._written = False

    @contextmanager
    def open(self):
        """A port on 127.0.0.1 for the length of the block; yields the session (``.port``, ``.said()``)."""
        self._write_config()
        session = _Session(self, process.current_owner())
        try:
            yield session
        finally:
            session.close()


class _Session:
    """One retrieve's port and the stunnel of each connection the service's own user made to it."""

    def __init__(self, tunnel, owner):
        self.tunnel = tunnel
        self.owner = owner  # the job whose tools these are: a cancel kills them too
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self._stunnels = []  # (process, reader thread, output tail)
        self._closing = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="tls-tunnel", daemon=True)
        self._acceptor.start()

    def _accept_loop(self):
        with process.owned_by(self.owner), selectors.DefaultSelector() as selector:
            selector.register(self.listener, selectors.EVENT_READ)
            while not self._closing.is_set():
                if selector.select(ACCEPT_TICK_S):
                    try:
                        conn, _ = self.listener.accept()
                    except OSError:
                        continue
                    with conn:
                        self._serve(conn)

    def _serve(self, conn):
        owner = socket_owner(conn)
        if owner != os.geteuid():
            self.tunnel.refused += 1
            log.warning("TLS tunnel to %s:%d: refused a connection of uid %s (only the service's own uid %d "
                        "may use it)", self.tunnel.host, self.tunnel.port, owner, os.geteuid())
            return
        try:
            proc = process.start([self.tunnel.stunnel, self.tunnel.config_path], stdin=conn.fileno(),
                                 stdout=conn.fileno(), stderr=subprocess.PIPE)
        except process.ToolMissing as exc:
            log.error("TLS tunnel: %s", exc)
            return
        tail = process.OutputTail()
        reader = threading.Thread(target=tail.read, args=(proc.stderr,), name="tls-tunnel-output", daemon=True)
        reader.start()
        self._stunnels.append((proc, reader, tail))

    def said(self):
        """What the stunnels said (their warnings and errors): read once ``close`` has run."""
        return "".join(tail.text() for _, _, tail in self._stunnels)

    def close(self):
        self._closing.set()
        self._acceptor.join()
        self.listener.close()
        for proc, reader, _ in self._stunnels:
            try:
                proc.wait(TUNNEL_END_S)
            except subprocess.TimeoutExpired:
                pass
            process.kill_group(proc)
            reader.join(TUNNEL_END_S)
