"""``--check-config`` as the service would run: the installed systemd unit's user and sandbox.

Checked as root, as the README has admins do, a configuration can pass
and the service still fail: root writes where the service user cannot (a
purge hands the kept audit trail to root), and the unit's sandbox
(``ProtectSystem=strict``) makes every folder outside its
``ReadWritePaths`` read-only to the service, whatever the folder's owner.
So ``--check-config`` reads the installed ``mkiso.service`` and its
drop-ins, checks again in a child process that has the unit's user, group
and groups (as systemd gives them), and names the drop-in a folder outside
the sandbox needs.  Without an installed unit (a checkout) only the user
is taken: ``mkiso``.
"""

import dataclasses
import grp
import os
import pwd
import shlex

from . import config as configuration

NAME = "mkiso.service"
SERVICE_USER = "mkiso"  # the package's (debian/mkiso.sysusers)
# systemd's unit folders, the one that wins first; /etc is where an admin's drop-ins go.
UNIT_DIRS = ["/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system"]
DROP_IN = "write-paths.conf"


@dataclasses.dataclass
class Unit:
    """What of the installed unit decides whether the service may write a folder."""

    files: list  # the unit file, then its drop-ins in the order systemd reads them
    user: str = "root"
    group: str = ""
    protect_system: str = "no"
    private_tmp: bool = False
    read_write_paths: list = dataclasses.field(default_factory=list)

    def hides(self, folder):
        """Whether the service sees a private, empty copy of ``folder`` (PrivateTmp=yes: /tmp, /var/tmp)."""
        return self.private_tmp and _inside(os.path.realpath(folder), ["/tmp", "/var/tmp"])

    def may_write(self, folder):
        """Whether the sandbox lets the service write ``folder`` (ProtectSystem=strict: only ReadWritePaths)."""
        return self.protect_system != "strict" or _inside(
            os.path.realpath(folder), [os.path.realpath(path) for path in self.read_write_paths])


def _inside(path, folders):
    return any(path == folder or path.startswith(folder.rstrip("/") + "/") for folder in folders)


def installed():
    """The installed unit with its drop-ins, or None when no mkiso.service is installed."""
    main = next((os.path.join(folder, NAME) for folder in UNIT_DIRS if os.path.isfile(os.path.join(folder, NAME))),
                None)
    if main is None:
        return None
    drop_ins = {}  # name -> path: a name in an earlier folder hides the same name in a later one
    for folder in reversed(UNIT_DIRS):
        try:
            names = os.listdir(os.path.join(folder, NAME + ".d"))
        except OSError:
            continue
        drop_ins.update({name: os.path.join(folder, NAME + ".d", name) for name in names if name.endswith(".conf")})
    unit = Unit(files=[main] + [drop_ins[name] for name in sorted(drop_ins)])
    for path in unit.files:
        for key, value in _service_settings(path):
            if key == "User":
                unit.user = value
            elif key == "Group":
                unit.group = value
            elif key == "ProtectSystem":
                unit.protect_system = value
            elif key == "PrivateTmp":
                unit.private_tmp = value.lower() in ("yes", "true", "on", "1")
            elif key == "ReadWritePaths":
                # an empty assignment resets the list; "-" (may be missing) and "+" prefixes name the same folder
                unit.read_write_paths = [] if not value else unit.read_write_paths + [
                    entry.lstrip("-+") for entry in shlex.split(value)]
    return unit


def _service_settings(path):
    """(key, value) of the [Service] section of one unit file, in order (continued lines joined)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read().replace("\\\n", " ")
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line:
            key, value = line.split("=", 1)
            yield key.strip(), value.strip()


def check(config):
    """Check ``config`` as the installed service would run it; raise ConfigError naming the fix.  Returns
    how it was checked (for the "valid" line)."""
    unit = installed()
    user = unit.user if unit else SERVICE_USER
    checked = _check_as(config, user, unit.group if unit else "")
    if unit is not None:
        _check_sandbox(config, unit)
    if config.server.x_accel_prefix:
        group = _service_gid(user, unit.group if unit else "")
        problem = configuration.nginx_cannot_read(config, group)
        if problem:
            raise configuration.ConfigError("%s: server.x_accel_prefix: %s" % (config.path, problem))
    return checked


def _service_gid(user, group):
    """The gid the service's files get: the unit's Group=, else its user's own group."""
    try:
        return grp.getgrnam(group).gr_gid if group else pwd.getpwnam(user).pw_gid
    except KeyError:
        return os.getegid()


def _check_as(config, user, group):
    """The checks of what the configuration points at, once more as ``user`` when run as root."""
    me = configuration.user_name(os.geteuid())
    if me == user:
        return "as the service user %s" % user
    if os.geteuid() != 0:
        return "as %s, not as the service user %s (run it as root to check as %s)" % (me, user, user)
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return "as root only: there is no user %s, which the service runs as" % user
    gid = _service_gid(user, group)
    status, message = _in_child(account, gid, lambda: configuration.check_system(configuration.load(config.path)))
    if status == 2:
        raise configuration.ConfigError("%s; checked as the service user %s, who runs the service" % (message, user))
    if status:
        raise configuration.ConfigError("%s: cannot check as the service user %s: %s" % (config.path, user, message))
    return "as the service user %s" % user


def _in_child(account, gid, function):
    """Run ``function`` in a child process with ``account``'s uid, ``gid`` and the groups systemd's User= gives
    (initgroups): (0, ""), or (2, its ConfigError's message), or (1, what else went wrong)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller
        status = 0
        try:
            os.close(read)
            os.setgroups(os.getgrouplist(account.pw_name, gid))
            os.setgid(gid)
            os.setuid(account.pw_uid)
            function()
        except configuration.ConfigError as exc:
            os.write(write, str(exc).encode("utf-8"))
            status = 2
        except BaseException as exc:  # whatever it is, the parent says it
            os.write(write, str(exc).encode("utf-8"))
            status = 1
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as handle:
        message = handle.read().decode("utf-8", "replace")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), message


def _check_sandbox(config, unit):
    """Every folder the service writes must be one the unit's sandbox lets it write; the error names the
    drop-in that adds them all (ReadWritePaths= adds up, so a line more in an existing drop-in does too)."""
    written = configuration.written_folders(config)
    for key, folder in written:
        if unit.hides(folder):
            raise configuration.ConfigError(
                "%s: %s: the folder %s is in /tmp or /var/tmp, of which the unit gives the service a private, empty "
                "copy (PrivateTmp=yes): choose a folder elsewhere" % (config.path, key, folder))
    outside = [(key, folder) for key, folder in written if not unit.may_write(folder)]
    if not outside:
        return
    line = "ReadWritePaths=%s" % " ".join(dict.fromkeys(folder for _, folder in outside))
    drop_in = os.path.join(UNIT_DIRS[0], NAME + ".d", DROP_IN)
    if os.path.exists(drop_in):
        fix = "add the line \"%s\" to the drop-in %s" % (line, drop_in)
    else:
        fix = "add the drop-in %s holding the two lines \"[Service]\" and \"%s\"" % (drop_in, line)
    key, folder = outside[0]
    raise configuration.ConfigError(
        "%s: %s: the folder %s is outside the folders the unit lets the service write (ProtectSystem=strict, "
        "ReadWritePaths=%s): the service would get \"Read-only file system\"; %s, then \"systemctl daemon-reload\" "
        "and restart mkiso" % (config.path, key, folder, " ".join(unit.read_write_paths), fix))
