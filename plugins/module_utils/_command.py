# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Runs the command-line tools the modules drive, as argv lists."""

from __future__ import annotations

# Where Debian keeps the system tools that a non-login PATH may lack.
SYSTEM_BIN_DIRS = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]


class CommandError(Exception):
    """A tool was missing or exited with a status that means failure."""


class CommandRunner:
    """Thin wrapper over AnsibleModule.run_command: argv only, LC_ALL=C."""

    def __init__(self, module):
        self.module = module
        self._paths = {}

    def binary(self, name):
        if name not in self._paths:
            path = self.module.get_bin_path(name, opt_dirs=SYSTEM_BIN_DIRS)
            if path is None:
                raise CommandError(
                    "the command %r is not installed on this host; install the "
                    "packages in the collection's bindep.txt" % name
                )
            self._paths[name] = path
        return self._paths[name]

    def run_capture(self, argv):
        """Run argv whatever it exits with; return (rc, stdout, stderr), for a caller that reads both."""
        command = [self.binary(argv[0])] + [str(arg) for arg in argv[1:]]
        return self.module.run_command(command, environ_update={"LC_ALL": "C"}, check_rc=False)

    def run(self, argv, ok_rcs=(0,), data=None):
        """Run argv; return (rc, stdout). Raise CommandError unless rc is in ok_rcs."""
        command = [self.binary(argv[0])] + [str(arg) for arg in argv[1:]]
        rc, out, err = self.module.run_command(
            command, environ_update={"LC_ALL": "C"}, data=data, check_rc=False
        )
        if rc not in ok_rcs:
            detail = (err or out or "").strip()
            raise CommandError(
                "%s exited with status %d: %s" % (" ".join([argv[0]] + command[1:]), rc, detail)
            )
        return rc, out
