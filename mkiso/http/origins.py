"""Requests from other web pages (SPEC §9): which origins and host names are mkiso's own.

A clerk's browser carries the clerk's network position (and, with auth
on, nothing else: the key lives in the desk page's tab, not in a cookie),
so a page on another site could otherwise start, cancel or read work
through it.  Three doors are closed here:

- ``Host``: comparing Origin with Host is worthless when the Host is the
  attacker's: with DNS rebinding, evil.example first resolves to the
  attacker and then to the gateway, and the browser takes the gateway for
  evil.example, same-origin, free to read /api/studies.  Over plain HTTP
  to a host name the browser marks nothing: Chromium sends ``Sec-Fetch-*``
  only to a secure origin (https, localhost, a loopback address) and no
  ``Origin`` with a same-origin GET, so such a request looks like the
  HIS's own.  Hence every request must name a host that is ours, whatever
  its other headers: an IP address (a page under an address cannot be
  rebound: its origin is the address itself), ``localhost``, the machine's
  own host name, a name in ``server.allowed_hosts`` or the host of an
  allowed origin.  A request without a Host header (HTTP/1.0) passes: no
  browser sends one, so no rebinding page can.  ``*`` in
  ``server.allowed_hosts`` gives the check up (and the docs say so).
- ``Origin``: a browser names the page that made a request.  One that is
  not ours is refused (403) for everything but fetching the desk page
  itself.  Ours is a page served under the request's own host name (ports
  and scheme aside: nginx in front ends TLS and passes ``$host`` without
  the port) or one listed in ``server.allowed_origins``.
- ``Sec-Fetch-*``, where the browser sends them (to a secure origin): a
  GET of an image or a script carries no Origin but says
  ``Sec-Fetch-Site: cross-site``, and such a fetch of anything but the
  page is refused (an ``<img>`` elsewhere would otherwise start a
  download).  Following a link (``Sec-Fetch-Mode: navigate``, the HIS's
  own links to the legacy URLs) stays allowed, but not into a frame:
  a hidden ``<iframe>`` is a navigation too, and printed a disc.
"""

import ipaddress
import socket
from urllib.parse import urlsplit

from .. import errors

ANY_HOST = "*"
FRAMES = frozenset(("iframe", "frame", "embed", "object"))  # Sec-Fetch-Dest of a navigation nobody sees


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


class Origins:
    def __init__(self, server):
        self.allowed_origins = {origin.rstrip("/").lower() for origin in server.allowed_origins}
        own = socket.gethostname().lower()
        self.any_host = ANY_HOST in server.allowed_hosts
        self.hosts = {"localhost", own, own.split(".")[0]}
        self.hosts |= {host_name(name) for name in server.allowed_hosts if name != ANY_HOST}
        self.hosts |= {host_name(urlsplit(origin).netloc) for origin in self.allowed_origins}

    def check_host(self, request):
        """403 for a request that names a host not ours, whatever else it says (none: HTTP/1.0, passes)."""
        host = host_name(request.header("Host"))
        if host and not (self.any_host or host in self.hosts or _is_ip(host) or host.endswith(".localhost")):
            raise errors.Forbidden(
                "This service does not answer to the host name %s (a web page elsewhere could reach it under "
                "a name of its own); if it is one of this gateway's names, add it to server.allowed_hosts."
                % host[:100], code="foreign_host")

    def check_origin(self, request, page):
        """403 for a request another web page made, unless it fetches the desk page (``page``) itself."""
        if page and request.method in ("GET", "HEAD"):
            return
        dest = request.header("Sec-Fetch-Dest") or "a resource"
        if request.header("Sec-Fetch-Site") == "cross-site" and (
                request.header("Sec-Fetch-Mode") != "navigate" or dest in FRAMES):
            raise errors.Forbidden("Another web site's page asked for this in passing (%s); refused. "
                                   "Open it with a link instead." % dest[:30])
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
