"""Configuration: defaults, every kind of mistake, and --check-config."""

import os
import subprocess
import sys

import pytest
import yaml

from mkiso import config as configuration

MINIMAL = "pacs: {ae_title: ABPACS, host: 127.0.0.1, port: 11112}\n"


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def load_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(configuration.ConfigError) as caught:
        configuration.load(path)
    message = str(caught.value)
    assert message.startswith(path + ": "), message
    assert "\n" not in message
    return message


def test_defaults_fill_everything_but_the_pacs(tmp_path, monkeypatch):
    monkeypatch.delenv("MKISO_API_KEY", raising=False)
    config = configuration.load(write(tmp_path, MINIMAL))
    assert config.pacs.ae_title == "ABPACS"
    assert (config.server.host, config.server.port, config.server.threads) == ("127.0.0.1", 8080, 8)
    assert (config.receiver.ae_title, config.receiver.port) == ("CDRECORD", 10104)
    assert config.publisher.host == ""
    assert config.iso.layout == "pdi" and config.iso.max_bytes == 4700000000
    assert config.paths.work_dir == "/var/spool/mkiso"
    assert config.timeouts.move_s == 1800 and config.timeouts.shutdown_s == 30
    assert config.limits.max_jobs == 4 and config.limits.allow_multi_patient is False
    assert config.auth.enabled is False and config.logging.format == "text"


def test_example_documents_every_key_with_its_default():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, "config.example.yaml"), encoding="utf-8") as handle:
        example = yaml.safe_load(handle)
    assert set(example) == set(configuration.SCHEMA)
    for section, keys in configuration.SCHEMA.items():
        assert set(example[section]) == set(keys), section
        for key, (_, default, _) in keys.items():
            if default is not configuration.REQUIRED:
                assert example[section][key] == default, "%s.%s" % (section, key)


@pytest.mark.parametrize("text, expected", [
    (MINIMAL + "sever: {port: 1}\n", "unknown section 'sever'"),
    (MINIMAL + "server: {prot: 8080}\n", "unknown key server.prot"),
    (MINIMAL + "server: {port: '8080'}\n", "server.port must be an integer, not '8080'"),
    (MINIMAL + "server: {port: 70000}\n", "server.port must be a TCP port between 1 and 65535"),
    (MINIMAL + "server: {port: 0}\n", "server.port must be a TCP port"),
    (MINIMAL + "limits: {allow_multi_patient: 'yes please'}\n", "limits.allow_multi_patient must be true or false"),
    (MINIMAL + "limits: {max_jobs: true}\n", "limits.max_jobs must be an integer"),
    (MINIMAL + "limits: {max_jobs: 0}\n", "limits.max_jobs must be greater than 0"),
    (MINIMAL + "timeouts: {find_s: fast}\n", "timeouts.find_s must be a number"),
    (MINIMAL + "iso: {layout: fancy}\n", "iso.layout must be one of: pdi, legacy"),
    (MINIMAL + "iso: {dicomdir: pydicom}\n", "iso.dicomdir must be one of: builtin, dcmmkdir"),
    (MINIMAL + "server: {x_accel_prefix: internal}\n", "server.x_accel_prefix must be empty or a location"),
    (MINIMAL + "server: {x_accel_prefix: /internal}\n", "server.x_accel_prefix must be empty or a location"),
    (MINIMAL + "server: {x_accel_keep_s: 0}\n", "server.x_accel_keep_s must be greater than 0"),
    (MINIMAL + "logging: {format: xml}\n", "logging.format must be one of: text, json"),
    (MINIMAL.replace("port: 11112", "port: 11112, retrieve: fetch"), "pacs.retrieve must be one of: move, get"),
    (MINIMAL + "receiver: {ae_title: 'AN_AE_TITLE_THAT_IS_TOO_LONG'}\n", "receiver.ae_title must be a DICOM AE title"),
    (MINIMAL + "patient_api: {url: 'http://his/patients'}\n", "patient_api.url must contain {accession}"),
    (MINIMAL + "server: [1, 2]\n", "server must be a mapping"),
    ("pacs: {host: 127.0.0.1, port: 11112}\n", "missing required key pacs.ae_title"),
    ("server: {port: 8080}\n", "missing required key pacs.ae_title"),
    ("pacs: {ae_title: A, host: h}\n", "missing required key pacs.port"),
    ("- just\n- a list\n", "the configuration must be a mapping of sections"),
    ("pacs: {ae_title: A\n", "invalid YAML"),
    (MINIMAL + "auth: {enabled: true}\n", "auth.enabled is true but no key is set"),
    (MINIMAL + "auth: {api_key_file: /nonexistent/key}\n", "auth.api_key_file /nonexistent/key cannot be read"),
])
def test_each_mistake_names_the_key(tmp_path, monkeypatch, text, expected):
    monkeypatch.delenv("MKISO_API_KEY", raising=False)
    assert expected in load_error(tmp_path, text)


def test_unreadable_file_is_named(tmp_path):
    path = str(tmp_path / "missing.yaml")
    with pytest.raises(configuration.ConfigError, match="missing.yaml: cannot read the configuration"):
        configuration.load(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(MINIMAL.encode() + b"# \xff\xfe\n")
    with pytest.raises(configuration.ConfigError, match="not UTF-8"):
        configuration.load(str(path))


def test_api_key_from_file_and_environment(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    config = configuration.load(write(tmp_path, MINIMAL + "auth: {enabled: true, api_key_file: %s}\n" % key_file))
    assert config.auth.api_key == "s3cret"
    monkeypatch.setenv("MKISO_API_KEY", "from-env")
    config = configuration.load(write(tmp_path, MINIMAL + "auth: {enabled: true}\n"))
    assert config.auth.api_key == "from-env"


def test_config_path_order(monkeypatch):
    monkeypatch.delenv("MKISO_CONFIG", raising=False)
    assert configuration.config_path() == "config.yaml"
    monkeypatch.setenv("MKISO_CONFIG", "/etc/mkiso/config.yaml")
    assert configuration.config_path() == "/etc/mkiso/config.yaml"
    assert configuration.config_path("/x.yaml") == "/x.yaml"


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mkiso"] + list(args), capture_output=True, text=True,
                          timeout=60, env=env)


def test_check_config_valid(tmp_path):
    result = run_cli("--check-config", "--config", write(tmp_path, MINIMAL))
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout


def test_check_config_invalid_exits_2_with_one_line(tmp_path):
    path = write(tmp_path, MINIMAL + "server: {port: nope}\n")
    result = run_cli("--check-config", "--config", path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mkiso: configuration error: %s: server.port must be an integer, not 'nope'" % path]


def test_check_config_uses_environment_path(tmp_path):
    env = dict(os.environ, MKISO_CONFIG=write(tmp_path, MINIMAL))
    assert run_cli("--check-config", env=env).returncode == 0


def test_start_with_broken_config_exits_2(tmp_path):
    result = run_cli("--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert "absent.yaml: cannot read the configuration" in result.stderr


def test_version():
    from mkiso import __version__
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == "mkiso " + __version__
