"""Configuration: defaults, every kind of mistake, and --check-config."""

import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile

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
            if key == "tls":  # shown whole, each key with its default
                assert example[section][key] == {name: value for name, (_, value, _)
                                                 in configuration.TLS_SCHEMA.items()}, section
            elif default is not configuration.REQUIRED:
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
    (MINIMAL + "limits: {max_studies_per_accession: 0}\n", "limits.max_studies_per_accession must be greater than 0"),
    (MINIMAL + "limits: {max_studies_per_accession: many}\n", "limits.max_studies_per_accession must be an integer"),
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
    ("pacs: {ae_title: ABPACS, host: '', port: 11112}\n", "pacs.host must not be empty"),
    ("pacs: {ae_title: ABPACS, host: ' ', port: 11112}\n", "pacs.host must not be empty"),
    (MINIMAL + "pacs: {ae_title: OTHER, host: 10.0.0.9, port: 104}\n", "(line 2): the key 'pacs' is given twice"),
    ("pacs: {ae_title: ABPACS, host: 127.0.0.1, port: 11112, port: 104}\n", "the key 'port' is given twice"),
    (MINIMAL + "server: {trusted_proxies: 127.0.0.1}\n", "server.trusted_proxies must be a list"),
    (MINIMAL + "server: {trusted_proxies: [nginx.local]}\n", "server.trusted_proxies must list IP addresses"),
    (MINIMAL + "auth: {keys: [a, b]}\n", "auth.keys must be a mapping"),
    (MINIMAL + "auth: {keys: {his: short}}\n", "auth.keys his: a key must be a string of at least 16"),
    (MINIMAL + "auth: {keys: {his: schl\u00fcssel-0123456789}}\n",
     "auth.keys his: a key must be a string of at least 16 printable ASCII"),
    (MINIMAL + "auth: {api_key: 'caf\u00e9-caf\u00e9'}\n",
     "auth.api_key (or its file, or $MKISO_API_KEY) must be printable ASCII"),
    (MINIMAL + "auth: {api_key: \"tab\\tinside\"}\n",
     "auth.api_key (or its file, or $MKISO_API_KEY) must be printable ASCII"),
    (MINIMAL + "auth: {keys: {'the his': 0123456789abcdef}}\n", "auth.keys names must be 1 to 64 letters"),
    (MINIMAL + "auth: {keys: {his: 0123456789abcdef, desk: 0123456789abcdef}}\n",
     "auth.keys gives the same key two names"),
    (MINIMAL + "audit: {path: ''}\n", "audit.path must not be empty"),
    (MINIMAL + "audit: {syslog: 'syslog.local:514'}\n", "audit.syslog must be empty or udp://host:port"),
    (MINIMAL + "audit: {syslog: 'udp://syslog.local:99999'}\n", "audit.syslog must be empty or udp://host:port"),
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
    monkeypatch.setenv("MKISO_API_KEY", "from-env-\u20ac")
    assert "$MKISO_API_KEY) must be printable ASCII" in load_error(tmp_path, MINIMAL + "auth: {enabled: true}\n")


def test_config_path_order(monkeypatch, tmp_path):
    """--config, else $MKISO_CONFIG, else ./config.yaml where it exists, else the installed file."""
    monkeypatch.delenv("MKISO_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert configuration.config_path() == "/etc/mkiso/config.yaml"
    (tmp_path / "config.yaml").write_text(MINIMAL)
    assert configuration.config_path() == "config.yaml"
    monkeypatch.setenv("MKISO_CONFIG", "/srv/other.yaml")
    assert configuration.config_path() == "/srv/other.yaml"
    assert configuration.config_path("/x.yaml") == "/x.yaml"


def test_check_config_elsewhere_names_the_installed_file(tmp_path):
    """Run from a folder without config.yaml, the check reads /etc/mkiso/config.yaml (absent here)."""
    env = {key: value for key, value in os.environ.items() if key != "MKISO_CONFIG"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(configuration.__file__))  # this mkiso, from anywhere
    if os.path.exists("/etc/mkiso/config.yaml"):
        pytest.skip("mkiso is installed on this machine: its config would be checked")
    result = subprocess.run([sys.executable, "-m", "mkiso", "--check-config"], capture_output=True, text=True,
                            timeout=60, env=env, cwd=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("mkiso: configuration error: /etc/mkiso/config.yaml: cannot read")


# mkiso-server as in a checkout, whatever this machine has installed: no systemd unit (--check-config would
# check the installed one's user and sandbox), the service run by whoever runs the tests.
CHECKOUT_CLI = ("import os, pwd, sys; from mkiso import server, unit; unit.UNIT_DIRS = []; "
                "unit.SERVICE_USER = pwd.getpwuid(os.geteuid()).pw_name; sys.exit(server.main())")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-c", CHECKOUT_CLI] + list(args), capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.fixture
def host(tmp_path):
    """A config whose paths exist here, and a way to break one thing in it."""
    work_dir = tmp_path / "work"
    work_dir.mkdir()

    def config(**sections):
        given = {"pacs": {"ae_title": "ABPACS", "host": "127.0.0.1", "port": 11112},
                 "paths": {"work_dir": str(work_dir)}, "audit": {"path": str(tmp_path / "audit.log")}}
        for section, values in sections.items():
            given.setdefault(section, {}).update(values)
        return write(tmp_path, yaml.safe_dump(given))

    config.work_dir = work_dir
    config.root = tmp_path
    return config


def test_check_config_valid(host):
    result = run_cli("--check-config", "--config", host())
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout
    assert os.listdir(host.work_dir) == [] and not (host.root / "audit.log").exists()


def test_check_config_invalid_exits_2_with_one_line(tmp_path):
    path = write(tmp_path, MINIMAL + "server: {port: nope}\n")
    result = run_cli("--check-config", "--config", path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mkiso: configuration error: %s: server.port must be an integer, not 'nope'" % path]


def test_check_config_warns_of_a_host_that_does_not_resolve(host):
    """A name that does not resolve now is a warning (DNS may come later), the file is still valid."""
    result = run_cli("--check-config", "--config", host(pacs={"host": "no-such-pacs.invalid"},
                                                       publisher={"host": "no-such-rimage.invalid"}))
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("mkiso: warning: %s: pacs.host no-such-pacs.invalid does not resolve: "
                                  % host.root.joinpath("config.yaml"))
    assert "publisher.host no-such-rimage.invalid does not resolve" in warnings[1]
    assert run_cli("--check-config", "--config", host()).stderr == ""  # 127.0.0.1 resolves


def test_check_config_uses_environment_path(host):
    env = dict(os.environ, MKISO_CONFIG=host())
    assert run_cli("--check-config", env=env).returncode == 0


CREATE_IT = " (create it, owned by the service user)"


def tools_copy(root, broken=None, how=None):
    """A dcmtk dir of links to the real tools, with ``broken`` missing or not executable."""
    from mkiso.config import DCMTK_TOOLS
    tools = root / "dcmtk"
    tools.mkdir()
    for name in DCMTK_TOOLS:
        if name == broken and how == "missing":
            continue
        if name == broken and how == "not executable":
            (tools / name).write_text("#!/bin/sh\n")
            continue
        (tools / name).symlink_to(shutil.which(name))
    return str(tools)


@pytest.mark.parametrize("breakage, expected", [
    ("dcmtk_dir_missing", "tools.dcmtk_dir /nonexistent/dcmtk is not a directory"),
    ("tool_missing", "tools.dcmtk_dir: {root}/dcmtk/movescu does not exist"),
    ("tool_not_executable", "tools.dcmtk_dir: {root}/dcmtk/storescp is not executable"),
    ("genisoimage_missing", "tools.genisoimage: /nonexistent/genisoimage does not exist"),
    ("work_dir_missing", "paths.work_dir: the folder {root}/absent does not exist" + CREATE_IT),
    ("work_dir_read_only", "paths.work_dir: the folder {root}/readonly is not writable: Read-only file system"
                           " (under systemd: outside the unit's ReadWritePaths; mkiso-server --check-config, run as"
                           " root, names the drop-in to add)"),
    ("audit_dir_missing", "audit.path: the folder {root}/no-logs does not exist" + CREATE_IT),
    ("viewer_dir_missing", "iso.viewer_dir {root}/viewer is not a directory"),
])
@pytest.mark.parametrize("command", [("--check-config",), ()], ids=["check-config", "start"])
def test_what_the_config_points_at_must_be_there(host, breakage, expected, command):
    """Each mistake stops --check-config and start-up with exit 2, naming the key; nothing is created."""
    root = host.root
    sections = {
        "dcmtk_dir_missing": {"tools": {"dcmtk_dir": "/nonexistent/dcmtk"}},
        "tool_missing": {"tools": {"dcmtk_dir": lambda: tools_copy(root, "movescu", "missing")}},
        "tool_not_executable": {"tools": {"dcmtk_dir": lambda: tools_copy(root, "storescp", "not executable")}},
        "genisoimage_missing": {"tools": {"genisoimage": "/nonexistent/genisoimage"}},
        "work_dir_missing": {"paths": {"work_dir": str(root / "absent")}},
        "work_dir_read_only": {"paths": {"work_dir": str(root / "readonly")}},
        "audit_dir_missing": {"audit": {"path": str(root / "no-logs" / "audit.log")}},
        "viewer_dir_missing": {"iso": {"viewer_dir": str(root / "viewer")}},
    }[breakage]
    sections = {name: {key: value() if callable(value) else value for key, value in values.items()}
                for name, values in sections.items()}
    mounted = None
    if breakage == "work_dir_read_only":
        mounted = root / "readonly"
        mounted.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mounted)]).returncode:
            pytest.skip("a read-only tmpfs cannot be mounted here (needs root)")
    try:
        path = host(**sections)
        before = sorted(os.listdir(root))
        result = run_cli("--config", path, *command)
    finally:
        if mounted:
            subprocess.run(["umount", str(mounted)], check=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "mkiso: configuration error: %s: %s" % (path, expected.format(root=root))]
    assert sorted(os.listdir(root)) == before and os.listdir(host.work_dir) == []


def test_a_start_that_fails_after_the_checks_leaves_nothing(host, monkeypatch, caplog):
    """Should the receiver fail to start anyway (a tool gone meanwhile), mkiso's folders go again."""
    from mkiso import server
    from mkiso.dicom import receiver

    def vanished(self):
        raise OSError("storescp vanished")

    monkeypatch.setattr(receiver.Receiver, "start", vanished)
    config = configuration.load(host())
    assert server.Server(config).run() == 1
    assert os.listdir(host.work_dir) == []
    assert "start-up failed" in caplog.text


def test_start_with_broken_config_exits_2(tmp_path):
    result = run_cli("--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert "absent.yaml: cannot read the configuration" in result.stderr


def test_version():
    from mkiso import __version__
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == "mkiso " + __version__


# -- --check-config as the installed service runs ------------------------------------------------------

SHIPPED_UNIT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "debian", "mkiso.service")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="checks as another user: only root can")


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """systemd's unit folders in miniature, holding the shipped unit (its user made ``nobody``, who exists
    everywhere); ``installed.unit(text)`` installs another; ``installed.etc`` is where drop-ins go."""
    from mkiso import unit
    folders = [tmp_path / "systemd" / name for name in ("etc", "run", "lib", "usr-lib")]
    for folder in folders:
        folder.mkdir(parents=True)
    monkeypatch.setattr(unit, "UNIT_DIRS", [str(folder) for folder in folders])

    def install(text=None):
        if text is None:
            with open(SHIPPED_UNIT, encoding="utf-8") as handle:
                text = handle.read().replace("User=mkiso", "User=nobody").replace("Group=mkiso", "Group=nogroup")
        (folders[2] / "mkiso.service").write_text(text)

    install.etc = folders[0]
    return install


@pytest.fixture
def folder_for_nobody(request):
    """A folder outside /tmp (the shipped unit's PrivateTmp hides /tmp) that the user nobody can reach."""
    for parent in ("/srv", "/var/lib", "/opt"):
        if os.path.isdir(parent):
            break
    base = tempfile.mkdtemp(prefix="mkiso-test-", dir=parent)
    request.addfinalizer(lambda: shutil.rmtree(base))
    os.chmod(base, 0o755)
    return base


def service_config(base, **sections):
    """A configuration in ``base`` whose work dir and audit folder the user nobody owns."""
    nobody = pwd.getpwnam("nobody")
    for name in ("work", "log"):
        os.mkdir(os.path.join(base, name), 0o750)
        os.chown(os.path.join(base, name), nobody.pw_uid, nobody.pw_gid)
    given = {"pacs": {"ae_title": "ABPACS", "host": "127.0.0.1", "port": 11112},
             "paths": {"work_dir": os.path.join(base, "work")},
             "audit": {"path": os.path.join(base, "log", "audit.log")}}
    for section, values in sections.items():
        given.setdefault(section, {}).update(values)
    path = os.path.join(base, "config.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(given, handle)
    os.chmod(path, 0o644)
    return path


def check_config(path, capsys):
    """--check-config in this process, where ``installed`` put the unit."""
    from mkiso import server
    status = server.main(["--check-config", "--config", path])
    output = capsys.readouterr()
    return status, output.out.strip(), output.err.strip()


def valid(path, checked="as the service user nobody"):
    """What check_config returns for a valid configuration, checked as ``checked`` says."""
    return 0, "mkiso: configuration %s is valid (checked %s)" % (path, checked), ""


@needs_root
def test_check_config_as_root_checks_as_the_service_user(installed, folder_for_nobody, capsys):
    """After a purge and a new install the kept audit trail was root's 0600: the service could not append
    to it, yet --check-config as root said "valid".  Now it checks as the unit's user, and says so."""
    installed("[Service]\nUser=nobody\nExecStart=/usr/bin/mkiso-server\n")
    path = service_config(folder_for_nobody)
    audit_log = os.path.join(folder_for_nobody, "log", "audit.log")
    with open(audit_log, "w") as handle:
        handle.write("{}\n")
    os.chmod(audit_log, 0o600)  # root's, as a purge leaves it
    assert check_config(path, capsys) == (2, "", (
        "mkiso: configuration error: %s: audit.path %s is not writable (0600 root:root); checked as the service "
        "user nobody, who runs the service" % (path, audit_log)))
    nobody = pwd.getpwnam("nobody")
    os.chown(audit_log, nobody.pw_uid, nobody.pw_gid)
    assert check_config(path, capsys) == valid(path)


@needs_root
def test_check_config_without_the_service_user_says_so(installed, host, capsys):
    installed("[Service]\nUser=no-such-mkiso-user\nExecStart=/usr/bin/mkiso-server\n")
    path = host()
    assert check_config(path, capsys) == valid(
        path, "as root only: there is no user no-such-mkiso-user, which the service runs as")


@needs_root
def test_check_config_names_the_drop_in_a_folder_outside_the_sandbox_needs(installed, folder_for_nobody, capsys):
    """paths.work_dir: /srv/mkiso, owned by the service user, is "Read-only file system" to the service under
    the shipped unit (ProtectSystem=strict): --check-config says so and names the drop-in that mends it;
    with that drop-in in place, the same configuration is valid."""
    installed()
    path = service_config(folder_for_nobody)
    work, log = os.path.join(folder_for_nobody, "work"), os.path.join(folder_for_nobody, "log")
    drop_in = installed.etc / "mkiso.service.d" / "write-paths.conf"
    assert check_config(path, capsys) == (2, "", (
        "mkiso: configuration error: %s: paths.work_dir: the folder %s is outside the folders the unit lets the "
        "service write (ProtectSystem=strict, ReadWritePaths=/var/spool/mkiso /var/log/mkiso): the service would "
        "get \"Read-only file system\"; add the drop-in %s holding the two lines \"[Service]\" and "
        "\"ReadWritePaths=%s %s\", then \"systemctl daemon-reload\" and restart mkiso"
        % (path, work, drop_in, work, log)))
    drop_in.parent.mkdir()
    drop_in.write_text("[Service]\nReadWritePaths=%s\n" % work)  # one of the two: the other is a line more
    status, _, error = check_config(path, capsys)
    assert status == 2 and error.endswith(
        "add the line \"ReadWritePaths=%s\" to the drop-in %s, then \"systemctl daemon-reload\" and restart mkiso"
        % (log, drop_in)), error
    with drop_in.open("a") as handle:
        handle.write("ReadWritePaths=%s\n" % log)
    assert check_config(path, capsys) == valid(path)


@needs_root
def test_check_config_says_the_unit_hides_tmp(installed, host, capsys):
    installed("[Service]\nProtectSystem=strict\nPrivateTmp=yes\nReadWritePaths=/var/spool/mkiso\n")
    path = host()
    status, _, error = check_config(path, capsys)
    assert status == 2
    assert error.startswith("mkiso: configuration error: %s: paths.work_dir: the folder %s is in /tmp or /var/tmp, "
                            "of which the unit gives the service a private, empty copy (PrivateTmp=yes)"
                            % (path, host.work_dir)), error


def test_unit_settings_as_systemd_reads_them(installed):
    """The last assignment wins, an empty ReadWritePaths= resets the list, drop-ins are read by name, an
    /etc drop-in hides one of the same name in /lib, and lines may be continued."""
    from mkiso import unit
    installed("[Unit]\nUser=ignored\n[Service]\nUser=a\nReadWritePaths=/one \\\n  -/two\nProtectSystem=strict\n")
    lib_drop_ins = os.path.join(unit.UNIT_DIRS[2], "mkiso.service.d")
    os.mkdir(lib_drop_ins)
    with open(os.path.join(lib_drop_ins, "b.conf"), "w") as handle:
        handle.write("[Service]\nReadWritePaths=/hidden\n")
    (installed.etc / "mkiso.service.d").mkdir()
    (installed.etc / "mkiso.service.d" / "b.conf").write_text("[Service]\nReadWritePaths=\nReadWritePaths=+/three\n")
    (installed.etc / "mkiso.service.d" / "a.conf").write_text("# a comment\n[Service]\nUser=b\n")
    found = unit.installed()
    assert (found.user, found.protect_system, found.read_write_paths) == ("b", "strict", ["/three"])
    assert found.may_write("/three/x") and not found.may_write("/threefold") and not found.may_write("/one")


@pytest.fixture
def nginx_as(tmp_path, monkeypatch):
    conf = tmp_path / "nginx.conf"
    conf.write_text("user www-data;\nworker_processes auto;\n")
    monkeypatch.setattr(configuration, "NGINX_CONF", str(conf), raising=False)


@needs_root
def test_check_config_says_when_nginx_cannot_read_the_discs(installed, nginx_as, tmp_path, capsys):
    """With server.x_accel_prefix nginx sends the discs from the work dir: before "adduser www-data mkiso"
    it answered 403 to every download.  --check-config names the missing membership and its fix."""
    if "www-data" not in {entry.pw_name for entry in pwd.getpwall()}:
        pytest.skip("no user www-data here")
    installed("[Service]\nUser=nobody\nExecStart=/usr/bin/mkiso-server\n")
    base = tempfile.mkdtemp(prefix="mkiso-test-")
    try:
        os.chmod(base, 0o755)
        path = service_config(base, server={"x_accel_prefix": "/internal/mkiso/"})
        work = os.path.join(base, "work")
        assert check_config(path, capsys) == (2, "", (
            "mkiso: configuration error: %s: server.x_accel_prefix: nginx's user www-data is not in the group "
            "nogroup, which alone may read the discs in %s: run \"adduser www-data nogroup\", then "
            "\"systemctl restart nginx\"" % (path, work)))
        os.chown(work, -1, grp.getgrnam("www-data").gr_gid)  # the discs get the group nginx is in
        os.chmod(work, 0o2770)
        assert check_config(path, capsys)[0] == 0
        os.chown(base, 0, pwd.getpwnam("nobody").pw_gid)
        os.chmod(base, 0o710)  # the service gets in, nginx does not
        assert check_config(path, capsys) == (2, "", (
            "mkiso: configuration error: %s: server.x_accel_prefix: nginx's user www-data cannot enter %s "
            "(0710 root:nogroup): let it through (e.g. chmod o+x %s)" % (path, base, base)))
    finally:
        shutil.rmtree(base)
