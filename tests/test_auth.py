"""API keys on their own, without a service: who a key names, who may call, whose jobs a caller sees.

The ``auth`` section is read by the real configuration loader, so these
tests see the same values (defaults, empty strings) the service would.
"""

import pytest
import yaml

from mkiso import config as configuration
from mkiso.http import auth

UNNAMED = "unnamed-key-0123456789"
HIS = "his-key-0123456789"
DESK = "desk-key-0123456789"
ADMIN = "admin-key-0123456789"


@pytest.fixture
def keys(tmp_path, monkeypatch):
    """Keys built from an ``auth`` section as the loader completes it from YAML."""
    monkeypatch.delenv("MKISO_API_KEY", raising=False)

    def make(**section):
        path = tmp_path / "config.yaml"
        settings = {"pacs": {"ae_title": "ABPACS", "host": "127.0.0.1", "port": 11112}, "auth": section}
        path.write_text(yaml.safe_dump(settings, allow_unicode=True), encoding="utf-8")
        return auth.Keys(configuration.load(str(path)).auth)

    return make


@pytest.fixture
def named(keys):
    """Two systems, an admin desk and the old unnamed key still in use."""
    return keys(enabled=True, api_key=UNNAMED, keys={"his": HIS, "desk": DESK, "admin": ADMIN},
                admin_keys=["admin"])


@pytest.mark.parametrize("given, expected", [
    (UNNAMED, (True, None)),
    (HIS, (True, "his")),
    (DESK, (True, "desk")),
    (ADMIN, (True, "admin")),
    ("wrong-key-0123456789", (False, None)),
    (HIS[:-1], (False, None)),  # a prefix is not the key
    (HIS + "0", (False, None)),  # nor is the key with more behind it
    (HIS.upper(), (False, None)),
    (" " + HIS, (False, None)),
    ("", (False, None)),
    (None, (False, None)),  # no X-API-Key header at all
    ("his", (False, None)),  # a key's name is not its key
])
def test_identify_names_the_caller_of_each_key(named, given, expected):
    """The name goes into the audit trail: a key must name its own caller and no other."""
    assert named.identify(given) == expected


@pytest.mark.parametrize("given, expected", [
    (UNNAMED, (True, None)),
    ("", (False, None)),
    (None, (False, None)),
    ("wrong-key-0123456789", (False, None)),
])
def test_identify_with_only_the_unnamed_key(keys, given, expected):
    assert keys(enabled=True, api_key=UNNAMED).identify(given) == expected


@pytest.mark.parametrize("given", ["", None, "anything"])
def test_no_key_configured_knows_no_caller(keys, given):
    """An empty api_key is no key: an empty or missing header must not match it."""
    assert keys().identify(given) == (False, None)


@pytest.mark.parametrize("given", ["", None])
def test_an_empty_key_never_matches_when_only_named_keys_are_set(keys, given):
    assert keys(enabled=True, keys={"his": HIS}).identify(given) == (False, None)


def test_a_header_beyond_ascii_matches_no_key_and_does_not_raise(keys):
    """Keys are printable ASCII (the config refuses others: test_config); a header arrives as Latin-1 text
    (PEP 3333), so a client's UTF-8 bytes, or a lone surrogate, must simply match nothing."""
    his = keys(enabled=True, keys={"his": HIS})
    assert his.identify(HIS) == (True, "his")
    for given in (HIS + "\u00e9", "schl\u00fcssel".encode("utf-8").decode("latin-1") + HIS, HIS[:-1] + "\udce2"):
        assert his.identify(given) == (False, None)


@pytest.mark.parametrize("enabled, known, allowed", [
    (True, True, True),
    (True, False, False),
    (False, True, True),
    (False, False, True),  # auth off: anyone on the network may call, key or not
])
def test_allows_asks_for_a_known_key_only_when_enabled(keys, enabled, known, allowed):
    assert keys(enabled=enabled, api_key=UNNAMED).allows(known) is allowed


@pytest.mark.parametrize("caller, job_caller, seen", [
    ("his", "his", True),
    ("his", "desk", False),  # one system does not see another's patients
    ("desk", "his", False),
    (None, "his", False),  # the unnamed key is no admin
    ("his", None, False),
    (None, None, True),
    ("admin", "his", True),
    ("admin", None, True),
])
def test_with_named_keys_a_caller_sees_its_own_jobs_and_an_admin_all(named, caller, job_caller, seen):
    assert named.sees(caller, job_caller) is seen


@pytest.mark.parametrize("caller, job_caller", [(None, None), (None, "x"), ("x", None), ("x", "y")])
def test_without_named_keys_every_caller_sees_every_job(keys, caller, job_caller):
    """One unnamed key cannot tell callers apart, so there is nothing to keep apart."""
    assert keys(enabled=True, api_key=UNNAMED).sees(caller, job_caller) is True


def test_a_name_in_admin_keys_is_a_key_name_not_a_key(named):
    """admin_keys lists names: a caller whose name happens to equal a key is not made an admin."""
    assert named.sees(ADMIN, "his") is False
