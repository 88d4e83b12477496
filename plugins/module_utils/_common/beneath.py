# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""File operations beneath the root of a tree that never follow a symlink.

The trees the modules change (an image copy, a cache, a restore destination)
come from hosts and may hold any symlink: `home -> /data/home`, `etc/hosts ->
/etc/hosts`. Every path inside them is reached one component at a time from
a descriptor of the root, each with O_NOFOLLOW, so a link is data: removing
`home` that is a link removes the link, writing `etc/hostname` that is a link
replaces the link, and a link on the way to a path (`var -> /var`) is refused.
Nothing here crosses a mount point when it deletes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from .errors import LivecloneError
from .fs import read_mounts

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# As many links as the kernel follows in one path (MAXSYMLINKS).
MAX_LINKS = 40


class BeneathError(LivecloneError):
    """A path in a tree is not what the operation may act on (a link on the way, a mount point)."""


def relative_parts(relative):
    """The components of a path relative to a tree's root; '..' is refused,
    '', '.' and leading or doubled slashes are dropped."""
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise BeneathError("the path %r climbs out of its tree with '..'" % relative)
    return parts


class Tree:
    """A directory, held open, and the paths beneath it."""

    def __init__(self, root):
        self.root = root
        try:
            self.fd = os.open(root, _DIR_FLAGS)
        except OSError:
            if os.path.islink(root):
                raise BeneathError("%s is a symlink (to %s), not a directory; it is never followed" % (
                    root, os.readlink(root))) from None
            raise
        self._mount_points = None

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def path(self, relative):
        """The absolute path of relative, for messages and for tools."""
        parts = relative_parts(relative)
        return os.path.join(self.root, *parts) if parts else self.root

    # Descriptors of directories beneath the root.

    @contextlib.contextmanager
    def directory(self, relative, create=False, mode=0o755):
        """A descriptor of the directory at relative, reached without
        following links; made (with its parents) when missing and create is set."""
        fd = os.dup(self.fd)
        walked = []
        try:
            for part in relative_parts(relative):
                walked.append(part)
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise FileNotFoundError(errno.ENOENT, "No such directory",
                                                self.path("/".join(walked))) from None
                    os.mkdir(part, mode, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as error:
                    if error.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise BeneathError(self._not_a_directory(fd, part, "/".join(walked))) from None
                    raise
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def _not_a_directory(self, dir_fd, name, relative):
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            return "%s is a symlink (to %s); it is never followed" % (
                self.path(relative), os.readlink(name, dir_fd=dir_fd))
        return "%s is not a directory" % self.path(relative)

    @contextlib.contextmanager
    def parent(self, relative, create=False):
        """(descriptor of the parent directory, last name) of relative."""
        parts = relative_parts(relative)
        if not parts:
            raise BeneathError("the root of %s itself is not an entry of it" % self.root)
        with self.directory("/".join(parts[:-1]), create=create) as fd:
            yield fd, parts[-1]

    # Reading.

    def lstat(self, relative):
        """os.lstat of relative, or None when it (or a directory on the way) is missing."""
        try:
            with self.parent(relative) as (fd, name):
                return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def readlink(self, relative):
        """The target of the symlink at relative."""
        with self.parent(relative) as (dir_fd, name):
            return os.readlink(name, dir_fd=dir_fd)

    def resolve(self, relative):
        """relative with every symlink on it resolved as the tree's own system
        would (an absolute target starts again at the tree's root, '..' stops at
        it): a path beneath the root free of links, or None when it leads to
        nothing inside the tree (or loops). It never leaves the tree. Only for
        reading a source tree's files (os-release, lib/modules, boot)."""
        pending = [part for part in relative.split("/") if part not in ("", ".")]
        resolved = []
        links = 0
        while pending:
            part = pending.pop(0)
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            candidate = "/".join(resolved + [part])
            try:
                info = self.lstat(candidate)
            except BeneathError:  # a file on the way
                return None
            if info is None:
                return None
            if stat.S_ISLNK(info.st_mode):
                links += 1
                if links > MAX_LINKS:
                    return None
                target = self.readlink(candidate)
                if target.startswith("/"):
                    resolved = []
                pending = [p for p in target.split("/") if p not in ("", ".")] + pending
                continue
            resolved.append(part)
        return "/".join(resolved)

    def is_dir(self, relative):
        info = self.lstat(relative) if relative_parts(relative) else os.fstat(self.fd)
        return info is not None and stat.S_ISDIR(info.st_mode)

    def is_file(self, relative):
        info = self.lstat(relative)
        return info is not None and stat.S_ISREG(info.st_mode)

    def listdir(self, relative=""):
        """Names in the directory at relative; [] when it is missing, a link or no directory."""
        try:
            with self.directory(relative) as fd:
                return sorted(os.listdir(fd))
        except (FileNotFoundError, BeneathError):
            return []

    def read_bytes(self, relative, limit=-1):
        """The bytes of the regular file at relative; None when it is missing,
        a link or not a regular file."""
        try:
            with self.parent(relative) as (dir_fd, name):
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except (FileNotFoundError, BeneathError):
            return None
        except OSError as error:
            if error.errno == errno.ELOOP:
                return None
            raise
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return None
            return handle.read(limit)

    def read_text(self, relative, limit=-1):
        data = self.read_bytes(relative, limit)
        return None if data is None else data.decode("utf-8", "replace")

    def walk(self, relative=""):
        """(relative directory, directory names, other names) for the tree at
        relative, top down; links are listed, never entered."""
        top = "/".join(relative_parts(relative))  # '..' is refused, not taken for a link
        try:
            with self.directory(relative) as fd:
                for directory, dirs, files, dir_fd in os.fwalk(".", dir_fd=fd):
                    # fwalk lists a link to a directory among the directories (not entering it).
                    links = [name for name in dirs if _is_link_at(dir_fd, name)]
                    dirs[:] = [name for name in dirs if name not in links]
                    inner = os.path.normpath(directory)
                    yield (top if inner == "." else os.path.join(top, inner) if top else inner), dirs, files + links
        except (FileNotFoundError, BeneathError):
            return

    # Writing.

    def makedirs(self, relative, mode=0o755):
        with self.directory(relative, create=True, mode=mode):
            pass

    def write_bytes(self, relative, data, mode=0o644):
        """Put data at relative as a new regular file of mode, atomically:
        whatever non-directory was there (a link included) is replaced."""
        with self.parent(relative) as (dir_fd, name):
            info = _lstat_at(dir_fd, name)
            if info is not None and stat.S_ISDIR(info.st_mode):
                raise BeneathError("%s is a directory; a file cannot be written there" % self.path(relative))
            temp = ".%s.liveclone-tmp" % name[:200]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=dir_fd)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         mode, dir_fd=dir_fd)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    os.fchmod(handle.fileno(), mode)
                os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=dir_fd)
                raise

    def write_text(self, relative, text, mode=0o644):
        self.write_bytes(relative, text.encode("utf-8"), mode)

    def symlink(self, target, relative):
        """A symlink at relative (whatever non-directory was there is replaced)."""
        with self.parent(relative) as (dir_fd, name):
            info = _lstat_at(dir_fd, name)
            if info is not None:
                if stat.S_ISDIR(info.st_mode):
                    raise BeneathError("%s is a directory; a link cannot replace it" % self.path(relative))
                os.unlink(name, dir_fd=dir_fd)
            os.symlink(target, name, dir_fd=dir_fd)

    def chmod(self, relative, mode):
        """Set the mode of the file or directory at relative; a link is left alone."""
        with self.parent(relative) as (dir_fd, name):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    return
                raise
            try:
                os.fchmod(fd, mode)
            finally:
                os.close(fd)

    def lchown(self, relative, uid, gid):
        with self.parent(relative) as (dir_fd, name):
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)

    def chown_tree(self, relative, uid, gid):
        """lchown of relative and everything beneath it ('' is the whole tree, its root included)."""
        if relative_parts(relative):
            self.lchown(relative, uid, gid)
        else:
            os.fchown(self.fd, uid, gid)
        for directory, dirs, files in self.walk(relative):
            for name in dirs + files:
                self.lchown(os.path.join(directory, name), uid, gid)

    def copy_within(self, source, dest):
        """Copy the tree at source into dest (both beneath the root), links as
        links. source must be a real directory: a link there (or on the way) is
        refused, not copied as nothing."""
        with self.directory(source):
            pass
        self.makedirs(dest)
        for directory, dirs, files in self.walk(source):
            inner = os.path.relpath(directory, "/".join(relative_parts(source)) or ".")
            target = dest if inner == "." else os.path.join(dest, inner)
            for name in dirs:
                self.makedirs(os.path.join(target, name),
                              stat.S_IMODE(self.lstat(os.path.join(directory, name)).st_mode))
            for name in files:
                path = os.path.join(directory, name)
                info = self.lstat(path)
                if stat.S_ISLNK(info.st_mode):
                    with self.parent(path) as (dir_fd, leaf):
                        self.symlink(os.readlink(leaf, dir_fd=dir_fd), os.path.join(target, name))
                elif stat.S_ISREG(info.st_mode):
                    self.write_bytes(os.path.join(target, name), self.read_bytes(path),
                                     stat.S_IMODE(info.st_mode))

    # Deleting.

    def remove(self, relative):
        """Delete whatever is at relative: a link (never what it points to), a
        file, or a directory with everything in it. Missing is not an error."""
        with contextlib.suppress(FileNotFoundError), self.parent(relative) as (dir_fd, name):
            self._remove_at(dir_fd, name, self.path(relative))

    def empty(self, relative, mode=0o755):
        """Leave an empty directory at relative. A link there is removed (not
        followed) and replaced by an empty directory; so is a file."""
        with self.parent(relative, create=True) as (dir_fd, name):
            info = _lstat_at(dir_fd, name)
            if info is not None and not stat.S_ISDIR(info.st_mode):
                os.unlink(name, dir_fd=dir_fd)
                info = None
            if info is None:
                os.mkdir(name, mode, dir_fd=dir_fd)
                return
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                for child in os.listdir(fd):
                    self._remove_at(fd, child, os.path.join(self.path(relative), child))
            finally:
                os.close(fd)

    def _remove_at(self, dir_fd, name, path):
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISDIR(info.st_mode):
            os.unlink(name, dir_fd=dir_fd)
            return
        if path in self.mount_points():
            raise BeneathError("%s is a mount point; unmount it first, nothing is deleted through it" % path)
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            for child in os.listdir(fd):
                self._remove_at(fd, child, os.path.join(path, child))
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dir_fd)

    def mount_points(self):
        """The mount points beneath the root, spelled as self.path() spells
        them. mountinfo names them by the kernel's path of the root, which
        differs from self.root when that has a link on the way, '//' or '..'."""
        if self._mount_points is None:
            real = self._real_root()
            prefix = real.rstrip("/") + "/"
            self._mount_points = frozenset(self.path(m.point[len(prefix):]) for m in read_mounts()
                                           if m.point.startswith(prefix) and m.point != real)
        return self._mount_points

    def _real_root(self):
        """The kernel's path of the open root (as mountinfo spells paths)."""
        try:
            return os.readlink("/proc/self/fd/%d" % self.fd)
        except OSError:
            return os.path.realpath(self.root)


def _is_link_at(dir_fd, name):
    info = _lstat_at(dir_fd, name)
    return info is not None and stat.S_ISLNK(info.st_mode)


def _lstat_at(dir_fd, name):
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
