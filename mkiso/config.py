"""Load and validate the YAML configuration (SPEC §6).

The schema below is the single source of the keys, their types and their
defaults; ``config.example.yaml`` documents the same keys for people.  Any
mistake stops start-up with one line that names the file and the key, so a
typo never silently falls back to a default on a hospital's gateway.
"""

import copy
import errno
import grp
import ipaddress
import os
import pwd
import re
import shutil
import socket
import stat
import tempfile
import types

import yaml

from . import process
from .dicom import tls

REQUIRED = object()


class ConfigError(Exception):
    """A configuration problem; the message is one line naming file and key."""


def _port(value):
    if not 1 <= value <= 65535:
        return "must be a TCP port between 1 and 65535"
    return None


def _positive(value):
    if value <= 0:
        return "must be greater than 0"
    return None


def _not_negative(value):
    if value < 0:
        return "must not be negative"
    return None


def _ae_title(value):
    if not 1 <= len(value.strip()) <= 16 or "\\" in value or not value.isprintable():
        return "must be a DICOM AE title: 1 to 16 printable characters, no backslash"
    return None


def _one_of(*choices):
    def check(value):
        if value not in choices:
            return "must be one of: %s" % ", ".join(choices)
        return None

    return check


def _placeholder_url(value):
    if value and "{accession}" not in value:
        return "must contain {accession} (or be empty to turn the patient API off)"
    if value and not value.startswith(("http://", "https://")):
        return "must be an http:// or https:// URL"
    return None


def _accel_prefix(value):
    if value and not (value.startswith("/") and value.endswith("/")):
        return "must be empty or a location that starts and ends with / (e.g. /internal/mkiso/)"
    return None


def _not_empty(value):
    if not value.strip():
        return "must not be empty"
    return None


def _networks(value):
    for entry in value:
        try:
            ipaddress.ip_network(entry, strict=False)
        except (TypeError, ValueError):
            return "must list IP addresses or networks (e.g. 127.0.0.1, 10.1.2.0/24); %r is not one" % (entry,)
    return None


def _sendable(key):
    """Whether an HTTP client can send ``key`` in X-API-Key as it is written: printable ASCII.  (A header
    arrives as Latin-1 text; a key with other characters would be accepted here and never match.)"""
    return key.isascii() and key.isprintable()


def _named_keys(value):
    for number, (name, key) in enumerate(value.items(), start=1):
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9._-]{1,64}$", name):
            # not shown: a key written where its name belongs would be printed
            return ("names must be 1 to 64 letters, digits, dots, dashes or underscores; the name of entry %d "
                    "is not" % number)
        if not isinstance(key, str) or len(key) < 16 or not _sendable(key):
            return "%s: a key must be a string of at least 16 printable ASCII characters" % name
    if len(set(value.values())) < len(value):
        return "gives the same key two names; the audit could not tell the callers apart"
    return None


ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^https?://\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?$")


def _origins(value):
    for entry in value:
        if not isinstance(entry, str) or not ORIGIN.match(entry.rstrip("/")):
            return "must list origins as a browser sends them, scheme://host[:port] (e.g. https://pacs-gw.example.org)"
    return None


def _host_names(value):
    for entry in value:
        if not isinstance(entry, str) or not re.match(r"^(\*|[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])$", entry):
            return "must list host names (e.g. pacs-gw.example.org), or * for any; %r is not one" % (entry,)
    return None


def _key_names(value):
    if not all(isinstance(name, str) for name in value):
        return "must list names of auth.keys"
    return None


SYSLOG_URL = re.compile(r"^(udp|tcp|tls)://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]):([0-9]{1,5})$")


def _syslog_url(value):
    match = SYSLOG_URL.match(value)
    if value and not (match and 1 <= int(match.group(3)) <= 65535):
        return ("must be empty or udp://host:port, tcp://host:port or tls://host:port (e.g. udp://127.0.0.1:514, "
                "tls://audit.example.org:6514)")
    return None


NUMBER = (int, float)

# Keys whose values are secrets: a message about them names the key, never shows its value.
SECRETS = ("auth.api_key", "auth.keys")

# section -> key -> (type, default, check)
SCHEMA = {
    "server": {
        "host": (str, "127.0.0.1", None),
        "port": (int, 8080, _port),
        "threads": (int, 8, _positive),
        "x_accel_prefix": (str, "", _accel_prefix),
        "x_accel_keep_s": (NUMBER, 600, _positive),
        "trusted_proxies": (list, ["127.0.0.1", "::1"], _networks),
        "allowed_origins": (list, [], _origins),
        "allowed_hosts": (list, [], _host_names),
    },
    "pacs": {
        "ae_title": (str, REQUIRED, _ae_title),
        "host": (str, REQUIRED, _not_empty),
        "port": (int, REQUIRED, _port),
        "retrieve": (str, "move", _one_of("move", "get")),
        "tls": (dict, {}, None),
    },
    "receiver": {
        "ae_title": (str, "CDRECORD", _ae_title),
        "port": (int, 10104, _port),
        "max_associations": (int, 16, _positive),
        "tls": (dict, {}, None),
    },
    "publisher": {
        "ae_title": (str, "RIMAGE", _ae_title),
        "host": (str, "", None),
        "port": (int, 104, _port),
        "tls": (dict, {}, None),
    },
    "patient_api": {
        "url": (str, "", _placeholder_url),
        "name_field": (str, "patient_name", None),
        "timeout_s": (NUMBER, 5, _positive),
        "retries": (int, 2, _not_negative),
    },
    "iso": {
        "layout": (str, "pdi", _one_of("pdi", "legacy")),
        "viewer_dir": (str, "", None),
        "volume_label": (str, "", None),
        "max_bytes": (int, 4700000000, _positive),
        "media": (str, "dvd", _one_of("cd", "dvd", "dvd-dl", "bd", "none")),
        "headroom_bytes": (int, 20000000, _not_negative),
        "transcode": (str, "keep", _one_of("keep", "explicit-le")),
        "dicomdir": (str, "builtin", _one_of("builtin", "dcmmkdir")),
        "institution": (str, "", None),
        "contact": (str, "", None),
        "private_objects": (str, "omit", _one_of("omit", "keep")),
        "web_content": (bool, True, None),
    },
    "zip": {
        "enabled": (bool, True, None),
        "max_bytes": (int, 0, _not_negative),
    },
    "paths": {
        "work_dir": (str, "/var/spool/mkiso", None),
    },
    "tools": {
        "dcmtk_dir": (str, "/usr/bin", None),
        "genisoimage": (str, "/usr/bin/genisoimage", None),
        "stunnel": (str, "/usr/bin/stunnel4", None),
    },
    "timeouts": {
        "find_s": (NUMBER, 30, _positive),
        "move_s": (NUMBER, 1800, _positive),
        "store_s": (NUMBER, 1800, _positive),
        "iso_s": (NUMBER, 900, _positive),
        "shutdown_s": (NUMBER, 30, _not_negative),
    },
    "limits": {
        "max_jobs": (int, 4, _positive),
        "max_accessions": (int, 20, _positive),
        "max_studies_per_accession": (int, 20, _positive),
        "min_free_bytes": (int, 1000000000, _not_negative),
        "allow_multi_patient": (bool, False, None),
        "max_pending_bytes": (int, 20000000000, _positive),
    },
    "auth": {
        "enabled": (bool, False, None),
        "api_key": (str, "", None),
        "api_key_file": (str, "", None),
        "keys": (dict, {}, _named_keys),
        "admin_keys": (list, [], _key_names),
    },
    "jobs": {
        "keep_s": (NUMBER, 3600, _positive),
        "max_queued": (int, 16, _not_negative),
        "max_failed": (int, 64, _not_negative),
        "max_per_minute": (int, 30, _positive),
    },
    "cache": {
        "max_bytes": (int, 20000000000, _not_negative),
        "ttl_s": (NUMBER, 14400, _positive),
    },
    "audit": {
        "path": (str, "/var/log/mkiso/audit.log", _not_empty),
        "syslog": (str, "", _syslog_url),
        "syslog_ca_file": (str, "", None),
    },
    "metrics": {
        "enabled": (bool, True, None),
    },
    "logging": {
        "level": (str, "info", _one_of("debug", "info", "warning", "error")),
        "format": (str, "text", _one_of("text", "json")),
    },
}

# pacs.tls, receiver.tls, publisher.tls (SPEC §14): checked as a section of their own.
TLS_SECTIONS = ("pacs", "receiver", "publisher")
TLS_SCHEMA = {
    "enabled": (bool, False, None),
    "certificate": (str, "", None),
    "private_key": (str, "", None),
    "ca_file": (str, "", None),
    "verify_peer": (bool, True, None),
    "profile": (str, "bcp195-nd", _one_of(*tls.PROFILES)),
}

TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", NUMBER: "a number",
              list: "a list", dict: "a mapping"}

# The dcmtk tools mkiso runs (tools.dcmtk_dir); health runs each one too.
DCMTK_TOOLS = ("findscu", "movescu", "getscu", "storescp", "storescu", "echoscu", "dcmmkdir", "dcmdjpeg", "dcmdrle",
               "dcmconv", "dcmj2pnm")


class _Loader(yaml.SafeLoader):
    """YAML whose mappings refuse a key given twice: otherwise the last one silently wins."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, "the key %r is given twice" % (key,), key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


INSTALLED_CONFIG = "/etc/mkiso/config.yaml"


def config_path(explicit=None):
    """--config PATH, else $MKISO_CONFIG, else ./config.yaml where it exists, else
    the installed /etc/mkiso/config.yaml: ``mkiso-server --check-config`` run
    anywhere on a gateway checks the file the service reads."""
    chosen = explicit or os.environ.get("MKISO_CONFIG")
    if chosen:
        return chosen
    return "config.yaml" if os.path.exists("config.yaml") else INSTALLED_CONFIG


def load(path):
    """Read, validate and complete the configuration at ``path``."""
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.load(handle, Loader=_Loader)
    except OSError as exc:
        raise ConfigError("%s: cannot read the configuration: %s" % (path, exc.strerror))
    except UnicodeDecodeError:
        raise ConfigError("%s: the configuration is not UTF-8 text" % path)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = " (line %d)" % (where.line + 1) if where else ""
        raise ConfigError("%s: invalid YAML%s: %s" % (path, line, getattr(exc, "problem", exc)))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("%s: the configuration must be a mapping of sections" % path)
    config = validate(raw, path)
    _resolve_api_key(config, path)
    return config


def validate(raw, path="<config>"):
    """Check ``raw`` (parsed YAML) against SCHEMA and return a namespace tree."""
    for section in raw:
        if section not in SCHEMA:
            raise ConfigError("%s: unknown section %r" % (path, section))
    sections = {}
    for section, keys in SCHEMA.items():
        given = raw.get(section)
        if given is None:
            given = {}
        if not isinstance(given, dict):
            raise ConfigError("%s: %s must be a mapping" % (path, section))
        sections[section] = types.SimpleNamespace(**_section(section, keys, given, path))
    for section in TLS_SECTIONS:
        sections[section].tls = _tls_setting(section + ".tls", sections[section].tls, path)
    audit = sections["audit"]
    if audit.syslog.startswith("tls://") and not audit.syslog_ca_file:
        raise ConfigError("%s: audit.syslog_ca_file must name the CA file that the syslog server's certificate "
                          "chains to when audit.syslog is tls://" % path)
    return types.SimpleNamespace(path=path, **sections)


def _tls_setting(name, given, path):
    """A section's ``tls`` mapping, checked like a section; when enabled, the files it needs are named."""
    setting = types.SimpleNamespace(**_section(name, TLS_SCHEMA, given, path))
    if setting.enabled:
        needed = ["certificate", "private_key"] + (["ca_file"] if setting.verify_peer else [])
        for key in needed:
            if not getattr(setting, key).strip():
                raise ConfigError("%s: %s.%s must name a PEM file when %s.enabled is true" % (path, name, key, name))
    return setting


def tls_settings(config):
    """(name, setting) of each TLS setting that is on: pacs.tls, receiver.tls (with pacs.retrieve: move),
    publisher.tls (with a publisher)."""
    used = {"pacs": True, "receiver": config.pacs.retrieve == "move", "publisher": bool(config.publisher.host)}
    return [(section + ".tls", getattr(config, section).tls) for section in TLS_SECTIONS
            if used[section] and getattr(config, section).tls.enabled]


def tunnelled(config):
    """Whether the PACS's retrieve tool lacks +tls where pacs.tls is on: then it goes through stunnel."""
    tool = "movescu" if config.pacs.retrieve == "move" else "getscu"
    return config.pacs.tls.enabled and not tls.native(os.path.join(config.tools.dcmtk_dir, tool))


def _section(section, keys, given, path):
    for key in given:
        if key not in keys:
            raise ConfigError("%s: unknown key %s.%s" % (path, section, key))
    values = {}
    for key, (kind, default, check) in keys.items():
        name = "%s.%s" % (section, key)
        if key not in given:
            if default is REQUIRED:
                raise ConfigError("%s: missing required key %s" % (path, name))
            values[key] = copy.deepcopy(default)
            continue
        value = given[key]
        if value is None and kind in (str, list, dict):
            value = kind()
        shown = "a value not shown here" if name in SECRETS else repr(value)
        if not _has_type(value, kind):
            kind_given = "" if name not in SECRETS else " (%s given)" % type(value).__name__
            raise ConfigError("%s: %s must be %s, not %s%s" % (path, name, TYPE_NAMES[kind], shown, kind_given))
        problem = check(value) if check else None
        if problem:
            raise ConfigError("%s: %s %s (got %s)" % (path, name, problem, shown))
        values[key] = value
    return values


def _has_type(value, kind):
    if isinstance(value, bool) and kind is not bool:
        return False
    return isinstance(value, kind)


def _resolve_api_key(config, path):
    """The key may live in a file or the environment rather than the YAML."""
    auth = config.auth
    if auth.api_key_file:
        try:
            with open(auth.api_key_file, encoding="utf-8") as handle:
                auth.api_key = handle.read().strip()
        except OSError as exc:
            raise ConfigError(
                "%s: auth.api_key_file %s cannot be read: %s" % (path, auth.api_key_file, exc.strerror)
            )
    elif os.environ.get("MKISO_API_KEY"):
        auth.api_key = os.environ["MKISO_API_KEY"]
    if auth.api_key and not _sendable(auth.api_key):
        raise ConfigError("%s: auth.api_key (or its file, or $MKISO_API_KEY) must be printable ASCII: an HTTP "
                          "client cannot send other characters in X-API-Key as they are written" % path)
    unknown = [name for name in auth.admin_keys if name not in auth.keys]
    if unknown:
        raise ConfigError("%s: auth.admin_keys names %s, which auth.keys does not name" % (path, ", ".join(unknown)))
    if auth.enabled and not auth.api_key and not auth.keys:
        raise ConfigError(
            "%s: auth.enabled is true but no key is set "
            "(auth.api_key, auth.api_key_file, $MKISO_API_KEY or auth.keys)" % path
        )


def tool_paths(config):
    """Every executable mkiso runs, as configured."""
    return [path for _, path in _tools(config)]


def _tools(config):
    """(where it is configured, path) of every executable mkiso runs."""
    tools = [("tools.dcmtk_dir", os.path.join(config.tools.dcmtk_dir, name)) for name in DCMTK_TOOLS]
    return tools + [("tools.genisoimage", config.tools.genisoimage), ("the system (util-linux)", process.SETPRIV)]


def _tls_tools(config):
    """(where it is configured, path) of the executables TLS needs: openssl (the certificates' dates), and
    stunnel where the retrieve tool has no +tls.  Not in ``_tools``: they have no --version to run."""
    if not tls_settings(config):
        return []
    return [("the system (openssl)", tls.OPENSSL)] + ([("tools.stunnel", config.tools.stunnel)]
                                                     if tunnelled(config) else [])


def check_system(config):
    """What the configuration points at must be there, as the user running this sees it.

    Run by ``--check-config`` and before start-up, so a mistake stops the
    service with its key named instead of failing on the first request.
    Nothing is created here: the work dir must exist (mkiso makes only its
    own folders inside), and the writability probes leave no file.
    """
    path = config.path
    dcmtk_dir = config.tools.dcmtk_dir
    if not os.path.isdir(dcmtk_dir):
        raise ConfigError("%s: tools.dcmtk_dir %s is not a directory" % (path, dcmtk_dir))
    for key, tool in _tools(config) + _tls_tools(config):
        if not os.path.isfile(tool):
            raise ConfigError("%s: %s: %s does not exist" % (path, key, tool))
        if not shutil.which(tool):
            raise ConfigError("%s: %s: %s is not executable" % (path, key, tool))
    for key, folder in written_folders(config):
        _check_writable_dir(path, key, folder)
    if os.path.exists(config.audit.path) and not os.access(config.audit.path, os.W_OK):
        raise ConfigError("%s: audit.path %s is not writable (%s)" % (path, config.audit.path,
                                                                     _mode(os.stat(config.audit.path))))
    viewer_dir = config.iso.viewer_dir
    if viewer_dir and not os.path.isdir(viewer_dir):
        raise ConfigError("%s: iso.viewer_dir %s is not a directory" % (path, viewer_dir))
    for name, setting in tls_settings(config):
        problem = tls.check_files(setting)
        if problem:
            raise ConfigError("%s: %s: %s" % (path, name, problem))
    if config.audit.syslog_ca_file:
        problem = tls.check_ca_file(config.audit.syslog_ca_file)
        if problem:
            raise ConfigError("%s: audit.syslog_ca_file: %s" % (path, problem))


def unresolved_hosts(config):
    """Warnings for peers whose host name does not resolve now (DNS may be down
    at the moment, or come up later: a warning, not an error)."""
    warnings = []
    peers = [("pacs.host", config.pacs.host, config.pacs.port)]
    if config.publisher.host:
        peers.append(("publisher.host", config.publisher.host, config.publisher.port))
    for key, host, port in peers:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            warnings.append("%s: %s %s does not resolve: %s" % (config.path, key, host, exc))
    return warnings


def written_folders(config):
    """(key, folder) of every folder the service writes: the work dir and the audit trail's."""
    return [("paths.work_dir", config.paths.work_dir),
            ("audit.path", os.path.dirname(os.path.abspath(config.audit.path)))]


def _check_writable_dir(path, key, folder):
    if not os.path.isdir(folder):
        raise ConfigError("%s: %s: the folder %s does not exist (create it, owned by the service user)"
                          % (path, key, folder))
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        # Under systemd that is the unit's sandbox (ProtectSystem=strict), whoever owns the folder.
        hint = (" (under systemd: outside the unit's ReadWritePaths; mkiso-server --check-config, run as root, "
                "names the drop-in to add)" if exc.errno == errno.EROFS else "")
        raise ConfigError("%s: %s: the folder %s is not writable: %s%s" % (path, key, folder, exc.strerror, hint))


# nginx's own default user on Debian, where nginx.conf says none.
NGINX_USER = "www-data"
NGINX_CONF = "/etc/nginx/nginx.conf"


def nginx_user():
    """The user nginx's workers run as: nginx.conf's ``user`` directive, else www-data."""
    try:
        with open(NGINX_CONF, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return NGINX_USER
    match = re.search(r"^\s*user\s+([^\s;]+)[^;]*;", text, re.MULTILINE)
    return match.group(1) if match else NGINX_USER


def nginx_cannot_read(config, gid=None):
    """Why nginx's user cannot read the discs mkiso hands it (server.x_accel_prefix), a sentence with the fix;
    None when it can.

    Those discs are files 0640 in folders 0750 under the work dir, of the group the service's files get
    (``gid``, the service's own group: by default the group of the process asking; the work dir's own
    where it has the setgid bit).  So nginx's user must be able to enter every folder down to the work
    dir and be in that group.  The groups are /etc/group's: nginx's workers get them when nginx starts,
    so a user added to a group reads only after nginx is restarted.  ``--check-config`` and health ask it.
    """
    user = nginx_user()
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return ("nginx's user %s does not exist here: nginx must run on this host to send the discs from %s"
                % (user, config.paths.work_dir))
    groups = set(os.getgrouplist(user, account.pw_gid))
    work_dir = os.path.realpath(config.paths.work_dir)
    folder = "/"
    for part in [""] + work_dir.strip("/").split("/"):
        folder = os.path.join(folder, part)
        try:
            info = os.stat(folder)
        except OSError as exc:
            return "cannot see whether nginx's user %s may enter %s: %s" % (user, folder, exc.strerror)
        if folder != work_dir and not _allows(info, account.pw_uid, groups, stat.S_IXOTH):
            return ("nginx's user %s cannot enter %s (%s): let it through (e.g. chmod o+x %s)"
                    % (user, folder, _mode(info), folder))
    owner = account.pw_uid == info.st_uid
    if info.st_mode & stat.S_ISGID:
        gid = info.st_gid
    elif gid is None:
        gid = os.getegid()
    if not owner and gid not in groups:
        group = _group_name(gid)
        return ("nginx's user %s is not in the group %s, which alone may read the discs in %s: run "
                "\"adduser %s %s\", then \"systemctl restart nginx\"" % (user, group, work_dir, user, group))
    if not _allows(info, account.pw_uid, groups, stat.S_IXOTH):
        return ("nginx's user %s cannot enter the work dir %s (%s): make it group-traversable (chmod 0750 %s)"
                % (user, work_dir, _mode(info), work_dir))
    return None


def _allows(info, uid, groups, other_bit):
    """Whether the mode bits of ``info`` give ``uid`` (with ``groups``) the permission whose bit for others
    is ``other_bit`` (ACLs aside)."""
    if uid == info.st_uid:
        return bool(info.st_mode & (other_bit << 6))
    if info.st_gid in groups:
        return bool(info.st_mode & (other_bit << 3))
    return bool(info.st_mode & other_bit)


def _mode(info):
    return "%04o %s:%s" % (stat.S_IMODE(info.st_mode), user_name(info.st_uid), _group_name(info.st_gid))


def user_name(uid):
    """The account's name, else the number (an id /etc/passwd does not know)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid):
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
