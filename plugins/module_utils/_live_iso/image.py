# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Edits to the image's copy of the source, every path beneath its root
through _beneath.Tree (a link is replaced, never followed): what the image
leaves out, the source's secrets and users, the hostname, the live user."""

from __future__ import annotations

import fnmatch
import hashlib
import re
import stat

from .._common.beneath import BeneathError, relative_parts
from .._common.rsync import is_excluded
from .desired import IsoError
from .source import file_in_tree, read_bounded

LIVE_GROUPS = ("sudo", "audio", "video", "cdrom", "plugdev", "netdev")
FIRST_USER_UID = 1000
NOBODY_UID = 65534
# Removed from the image: machine identity and secrets of the source.
SECRET_GLOBS = (
    "etc/ssh/ssh_host_*", "etc/NetworkManager/system-connections/*", "var/lib/dbus/machine-id",
    "etc/crypttab", "etc/initramfs-tools/conf.d/resume",
)
HISTORY_NAMES = (".bash_history", ".zsh_history", ".python_history", ".lesshst", ".viminfo",
                 ".mysql_history", ".psql_history")
# Emptied in the image, with the mode each gets when the module has to make it.
EMPTIED_DIRS = (("tmp", 0o1777), ("var/tmp", 0o1777), ("var/cache/apt/archives", 0o755),
                ("var/lib/apt/lists", 0o755))
_WILDCARD = re.compile(r"[*?\[]")
# A user database is about 100 bytes an account: a larger one than this is refused, not read.
USER_DB_LIMIT = 16 << 20
# A uid as a user database writes it: ASCII digits (str.isdigit takes "²", which int() refuses).
_UID = re.compile(r"[0-9]{1,10}")


def remove_excluded(tree, patterns):
    """Remove from the image every entry the /-anchored patterns leave out,
    as rsync's --exclude reads them (_rsync.is_excluded). A link is removed,
    never followed, and a path with a link on the way is not the image's to
    act on. Only the directories a pattern can reach are walked. Returns the
    relative paths removed."""
    patterns = tuple(patterns)
    removed = []
    for pattern in patterns:
        if ".." in pattern.split("/"):
            continue  # names nothing beneath the root (rsync matches no path with '..' either)
        parts = relative_parts(pattern)
        literal = []
        for part in parts:
            if _WILDCARD.search(part):
                break
            literal.append(part)
        start = "/".join(literal)
        if len(literal) == len(parts):
            try:
                present = bool(start) and tree.lstat(start) is not None
            except BeneathError:
                present = False
            if present:
                tree.remove(start)
                removed.append(start)
            continue
        for directory, dirs, files in tree.walk(start):
            for name in sorted(dirs + files):
                relative = directory + "/" + name if directory else name
                if is_excluded("/" + relative, patterns):
                    tree.remove(relative)
                    removed.append(relative)
                    if name in dirs:
                        dirs.remove(name)
    return removed


def password_hash(runner, user, password, label):
    """The salted SHA-512 crypt of password, or None; openssl reads it on stdin."""
    if not password:
        return None
    # A salt derived from the user and the label keeps the build reproducible.
    salt = hashlib.sha256(("%s:%s" % (user, label)).encode()).hexdigest()[:16]
    return runner.run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"], data=password)[1].strip()


def removed_account(desired, fields):
    """Whether the image drops the account of this passwd line."""
    uid = _uid(fields)
    return uid is not None and FIRST_USER_UID <= uid < NOBODY_UID and fields[0] not in desired.keep_users


class ImageEditor:
    """Edits the image's tree; `found` collects the texts of what it found to
    do (users removed, links replaced), `warnings` what the user should know."""

    def __init__(self, runner, desired):
        self.runner = runner
        self.desired = desired
        self.found = []
        self.warnings = []

    def real_dir(self, tree, relative, mode=0o755, create=True):
        """Make relative a real directory of the image: a symlink (or a file)
        at it or on the way to it is removed, never followed, and replaced by
        an empty directory. False when it is missing and create is not set."""
        parts = relative_parts(relative)
        for index in range(1, len(parts) + 1):
            prefix = "/".join(parts[:index])
            info = tree.lstat(prefix)
            if info is not None and stat.S_ISDIR(info.st_mode):
                continue
            if info is None and not create:
                return False
            wanted = mode if index == len(parts) else 0o755
            if info is not None:
                what = ("symlink %s (to %s)" % (prefix, tree.readlink(prefix)) if stat.S_ISLNK(info.st_mode)
                        else "file %s" % prefix)
                tree.remove(prefix)
                self.found.append("replaced the %s in the image by an empty directory; what it pointed "
                                  "to was not touched" % what)
            tree.makedirs(prefix, wanted)
            tree.chmod(prefix, wanted)  # mkdir's mode is cut by the umask
        return True

    def _emptied(self, tree, relative, mode):
        self.real_dir(tree, relative, mode)
        tree.empty(relative)

    def clean(self, tree):
        """Remove the source's secrets, homes (unless kept), histories, logs, caches and users."""
        for pattern in SECRET_GLOBS:
            directory, wanted = pattern.rsplit("/", 1)
            if not self.real_dir(tree, directory, create=False):
                continue
            for name in tree.listdir(directory):
                if fnmatch.fnmatchcase(name, wanted):
                    tree.remove(directory + "/" + name)
        # Empty: systemd makes a new one at boot. A link there is replaced.
        tree.write_text("etc/machine-id", "", 0o644)
        if not self.desired.keep_home:
            self._emptied(tree, "home", 0o755)
            self._emptied(tree, "root", 0o700)
        homes = ["root"] + ["home/" + name for name in tree.listdir("home")]
        for home in homes:
            # A home that is a link (kept with keep_home) is resolved as the image
            # sees it, never out of the image; its histories go in any case.
            inside = tree.resolve(home)
            if inside is None or not tree.is_dir(inside):
                continue
            for name in HISTORY_NAMES:
                tree.remove(inside + "/" + name if inside else name)
        for directory, mode in EMPTIED_DIRS:
            self._emptied(tree, directory, mode)
        if self.real_dir(tree, "var/log", create=False):
            for directory, _dirs, files in list(tree.walk("var/log")):
                for name in files:
                    tree.remove(directory + "/" + name)
        self._remove_users(tree)

    def _remove_users(self, tree):
        removed = set()

        def drop_users(fields):
            if removed_account(self.desired, fields):
                removed.add(fields[0])
                return None
            return fields

        _edit_db(tree, "etc/passwd", drop_users)
        _edit_db(tree, "etc/shadow", lambda f: None if f[0] in removed else f)

        def drop_groups(fields):
            if fields[0] in removed:
                return None
            members = [m for m in fields[-1].split(",") if m and m not in removed]
            return fields[:-1] + [",".join(members)]

        _edit_db(tree, "etc/group", drop_groups)
        _edit_db(tree, "etc/gshadow", drop_groups)
        for name in sorted(removed):
            self.found.append("removed user %s" % name)

    def configure(self, tree, epoch):
        """The hostname, a live fstab, root's password (or a locked root) and the live user."""
        hostname = self.desired.hostname
        # A link at any of these (etc/hosts -> /etc/hosts) is replaced, never written through.
        tree.write_text("etc/hostname", hostname + "\n")
        tree.write_text("etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost "
                        "ip6-localhost ip6-loopback\n" % hostname)
        # The source's fstab names its own disks; live-boot mounts the root.
        tree.write_text("etc/fstab", "# live system: live-boot mounts the root filesystem\n")
        days = epoch // 86400
        root_hash = password_hash(self.runner, "root", self.desired.root_password, self.desired.label)
        _edit_db(tree, "etc/shadow", lambda f: [f[0], root_hash or "!*", str(days)] + f[3:]
                 if f[0] == "root" else f)
        user = self.desired.live_user
        if user:
            self._add_user(tree, user, password_hash(self.runner, "live", self.desired.live_password,
                                                     self.desired.label), days)
            if not self.desired.live_password:
                self.warnings.append("live_user %s has no password, so it cannot log in on a console; "
                                     "set live_password" % user)

    def _add_user(self, tree, user, hashed, days):
        passwd = read_db(tree, "etc/passwd") or []
        if any(fields[0] == user for fields in passwd):
            raise IsoError("live_user %s already exists in the source as a system user; choose another name"
                           % user)
        groups = read_db(tree, "etc/group") or []
        used = {_uid(fields) for fields in passwd} | {_uid(fields) for fields in groups}
        uid = next((number for number in range(FIRST_USER_UID, NOBODY_UID) if number not in used), None)
        if uid is None:
            raise IsoError("the image has no free uid from %d to %d for live_user %s; remove unused accounts "
                           "from the source" % (FIRST_USER_UID, NOBODY_UID - 1, user))
        home = "home/" + user
        _append_db(tree, "etc/passwd", [user, "x", str(uid), str(uid), user, "/" + home, "/bin/bash"])
        _append_db(tree, "etc/shadow", [user, hashed or "!", str(days), "0", "99999", "7", "", "", ""])
        _append_db(tree, "etc/group", [user, "x", str(uid), ""])
        _append_db(tree, "etc/gshadow", [user, "!", "", ""])

        def add_member(fields):
            if fields[0] in LIVE_GROUPS:
                members = [m for m in fields[-1].split(",") if m]
                return fields[:-1] + [",".join(members + [user])]
            return fields

        _edit_db(tree, "etc/group", add_member)
        _edit_db(tree, "etc/gshadow", add_member)
        # home/USER must be a real directory of the image: a link there (or at
        # home) is replaced, and etc/skel is copied only when it is a real directory.
        self.real_dir(tree, home, 0o700)
        skel = tree.lstat("etc/skel")
        if skel is not None and stat.S_ISDIR(skel.st_mode):
            tree.copy_within("etc/skel", home)
        elif skel is not None:
            self.found.append("left etc/skel out of %s's home: it is a symlink, never followed" % user)
        tree.chown_tree(home, uid, uid)
        tree.chmod(home, 0o700)
        self.found.append("added live user %s (uid %d, groups %s)" % (user, uid, ",".join(LIVE_GROUPS)))


# --- the user databases ----------------------------------------------------------

def _uid(fields):
    return int(fields[2]) if len(fields) > 2 and _UID.fullmatch(fields[2]) else None


def read_db(tree, name, where="the image"):
    """The lines of a user database of the tree split in fields; None when it
    is missing. One that is a link is read only where it leads inside the tree."""
    inside = file_in_tree(tree, name, where)
    if inside is None:
        return None
    text = (read_bounded(tree, inside, USER_DB_LIMIT, "a user database", where) or b"").decode("utf-8", "replace")
    return [line.split(":") for line in text.splitlines() if line.strip()]


def _edit_db(tree, name, change, extra=()):
    """Rewrite a user database of the tree line by line (and add extra lines):
    a new file with the old one's mode and owner. A link there is replaced,
    never written through. A database the tree lacks is left missing."""
    inside = file_in_tree(tree, name, "the image")
    if inside is None:
        return
    info = tree.lstat(inside)
    rows = [row for row in (change(fields) for fields in read_db(tree, inside)) if row is not None]
    tree.write_text(name, "".join(":".join(row) + "\n" for row in rows + list(extra)), stat.S_IMODE(info.st_mode))
    tree.lchown(name, info.st_uid, info.st_gid)


def _append_db(tree, name, fields):
    _edit_db(tree, name, lambda f: f, [fields])
