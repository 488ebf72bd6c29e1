"""Requests from other web pages (SPEC §9): which origins and host names are mkiso's own.

A clerk's browser carries the clerk's network position (and, with auth
on, nothing else: the key lives in the desk page's tab, not in a cookie),
so a page on another site could otherwise start, cancel or read work
through it.  Two doors are closed here:

- ``Origin``: a browser names the page that made a request.  One that is
  not ours is refused (403) for everything but fetching the desk page
  itself.  Ours is a page served under the request's own host name (ports
  and scheme aside: nginx in front ends TLS and passes ``$host`` without
  the port) or one listed in ``server.allowed_origins``.  A browser sends
  no Origin with a plain GET of an image or a script; it says
  ``Sec-Fetch-Site: cross-site`` then, and such a fetch of anything but the
  page is refused too (an ``<img>`` on another site would otherwise start a
  download).  Following a link (``Sec-Fetch-Mode: navigate``, the HIS's
  own links to the legacy URLs) stays allowed.
- ``Host``: comparing Origin with Host is worthless when the Host is the
  attacker's: with DNS rebinding, evil.example first resolves to the
  attacker and then to the gateway, and the browser takes the gateway for
  evil.example, same-origin, free to read /api/studies.  So a request a
  page's script made (``Sec-Fetch-Mode`` other than ``navigate``, or an
  ``Origin``: what a rebinding attack needs to read an answer) must name a
  host that is ours: an IP address, ``localhost``, the machine's own host
  name, a name in ``server.allowed_hosts`` or the host of an allowed
  origin.  Clients that are no browser (the HIS's server calling the
  legacy URLs, curl) and a clerk following a link are not asked: they may
  use any name of the gateway (nginx's ``server_name``), and the check
  could not stop them anyway.  ``*`` in ``server.allowed_hosts`` gives the
  check up (and says so in the docs).
"""

import ipaddress
import socket
from urllib.parse import urlsplit

from .. import errors

ANY_HOST = "*"


def host_name(value):
    """The host name of a Host header or an origin's netloc, lower case, without port or brackets."""
    value = (value or "").strip().lower()
    if value.startswith("["):  # [::1]:8080
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _is_ip(name):
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _from_a_script(request):
    """Whether a web page's script (fetch, XHR, a resource) made the request, as browsers mark it."""
    mode = request.header("Sec-Fetch-Mode")
    return (mode is not None and mode != "navigate") or request.header("Origin") is not None


class Origins:
    def __init__(self, server):
        self.allowed_origins = {origin.rstrip("/").lower() for origin in server.allowed_origins}
        own = socket.gethostname().lower()
        self.any_host = ANY_HOST in server.allowed_hosts
        self.hosts = {"localhost", own, own.split(".")[0]}
        self.hosts |= {host_name(name) for name in server.allowed_hosts if name != ANY_HOST}
        self.hosts |= {host_name(urlsplit(origin).netloc) for origin in self.allowed_origins}

    def check_host(self, request):
        """403 for a page's script whose request names a host not ours (none: HTTP/1.0, passes)."""
        if not _from_a_script(request):
            return
        host = host_name(request.header("Host"))
        if host and not (self.any_host or host in self.hosts or _is_ip(host) or host.endswith(".localhost")):
            raise errors.Forbidden(
                "This service does not answer to the host name %s; if it is one of this gateway's names, "
                "add it to server.allowed_hosts." % host[:100], code="foreign_host")

    def check_origin(self, request, page):
        """403 for a request another web page made, unless it fetches the desk page (``page``) itself."""
        if page and request.method in ("GET", "HEAD"):
            return
        if request.header("Sec-Fetch-Site") == "cross-site" and request.header("Sec-Fetch-Mode") != "navigate":
            raise errors.Forbidden("Another web site's page asked for this in passing (%s); refused."
                                   % (request.header("Sec-Fetch-Dest") or "a resource")[:30])
        origin = request.header("Origin")
        if origin is not None and not self.own(origin, host_name(request.header("Host"))):
            raise errors.Forbidden("Requests from other web pages (%s) are refused; add the origin to "
                                   "server.allowed_origins if it is one of ours." % origin[:100])

    def own(self, origin, host):
        origin = origin.strip().rstrip("/").lower()
        if origin in self.allowed_origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and bool(host) and host_name(parts.netloc) == host
