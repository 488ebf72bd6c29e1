"""Load and validate the YAML configuration (SPEC §6).

The schema below is the single source of the keys, their types and their
defaults; ``config.example.yaml`` documents the same keys for people.  Any
mistake stops start-up with one line that names the file and the key, so a
typo never silently falls back to a default on a hospital's gateway.
"""

import os
import types

import yaml

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


NUMBER = (int, float)

# section -> key -> (type, default, check)
SCHEMA = {
    "server": {
        "host": (str, "127.0.0.1", None),
        "port": (int, 8080, _port),
        "threads": (int, 8, _positive),
        "x_accel_prefix": (str, "", _accel_prefix),
        "x_accel_keep_s": (NUMBER, 600, _positive),
    },
    "pacs": {
        "ae_title": (str, REQUIRED, _ae_title),
        "host": (str, REQUIRED, None),
        "port": (int, REQUIRED, _port),
        "retrieve": (str, "move", _one_of("move", "get")),
    },
    "receiver": {
        "ae_title": (str, "CDRECORD", _ae_title),
        "port": (int, 10104, _port),
    },
    "publisher": {
        "ae_title": (str, "RIMAGE", _ae_title),
        "host": (str, "", None),
        "port": (int, 104, _port),
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
        "dicomdir": (str, "builtin", _one_of("builtin", "dcmmkdir")),
    },
    "paths": {
        "work_dir": (str, "/var/spool/mkiso", None),
    },
    "tools": {
        "dcmtk_dir": (str, "/usr/bin", None),
        "genisoimage": (str, "/usr/bin/genisoimage", None),
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
        "min_free_bytes": (int, 1000000000, _not_negative),
        "allow_multi_patient": (bool, False, None),
    },
    "auth": {
        "enabled": (bool, False, None),
        "api_key": (str, "", None),
        "api_key_file": (str, "", None),
    },
    "logging": {
        "level": (str, "info", _one_of("debug", "info", "warning", "error")),
        "format": (str, "text", _one_of("text", "json")),
    },
}

TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", NUMBER: "a number"}


def config_path(explicit=None):
    """--config PATH, else $MKISO_CONFIG, else ./config.yaml."""
    return explicit or os.environ.get("MKISO_CONFIG") or "config.yaml"


def load(path):
    """Read, validate and complete the configuration at ``path``."""
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
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
    return types.SimpleNamespace(path=path, **sections)


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
            values[key] = default
            continue
        value = given[key]
        if value is None and kind is str:
            value = ""
        if not _has_type(value, kind):
            raise ConfigError("%s: %s must be %s, not %r" % (path, name, TYPE_NAMES[kind], value))
        problem = check(value) if check else None
        if problem:
            raise ConfigError("%s: %s %s (got %r)" % (path, name, problem, value))
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
    if auth.enabled and not auth.api_key:
        raise ConfigError(
            "%s: auth.enabled is true but no key is set "
            "(auth.api_key, auth.api_key_file or $MKISO_API_KEY)" % path
        )
