# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Rules for the strings that the modules write into files that decide who
logs in and what boots (passwd, shadow, grub.cfg, hostname, snapper configs,
filesystem labels). Each check returns None, or the message refusing the
value and saying what to give instead. Patterns are matched whole
(fullmatch): `$` would let a trailing newline through."""

from __future__ import annotations

import re

# POSIX portable user names, as Debian's adduser takes them by default.
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# One RFC 1123 label: the live system's short host name.
HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# snapper's config names become file names in /etc/snapper/configs.
SNAPPER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Labels go into blkid's output, kernel command lines and GRUB's search: the
# characters that no tool escapes or splits.
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# One kernel parameter: printable ASCII without blanks, quotes or what GRUB reads as syntax.
BOOT_PARAM = re.compile(r"[!%(-:=?-Z\[\]^_a-z~]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_user_name(name, value):
    if not USER_NAME.fullmatch(value):
        return ("%s %r is not a user name; use at most 32 of lower-case letters, digits, '_' and '-', "
                "starting with a letter or '_'" % (name, value))
    return None


def check_host_name(name, value):
    if not HOST_NAME.fullmatch(value):
        return ("%s %r is not a host name; use letters, digits and '-' (at most 63, not starting or "
                "ending with '-')" % (name, value))
    return None


def check_snapper_name(name, value):
    if not SNAPPER_NAME.fullmatch(value):
        return ("%s %r is not a snapper config name; use letters, digits, '-', '_' and '.', starting "
                "with a letter or digit, at most 64" % (name, value))
    return None


def check_label(name, value, max_bytes, holder):
    """A label of at most max_bytes bytes, as holder (a filesystem, an ISO volume id) stores it."""
    if not LABEL.fullmatch(value):
        return ("%s %r is not a label %s can hold unchanged; use ASCII letters, digits, '_', '.' and '-', "
                "starting with a letter or digit" % (name, value, holder))
    if len(value.encode("utf-8")) > max_bytes:
        return "%s %r is longer than the %d bytes %s holds; shorten it" % (name, value, max_bytes, holder)
    return None


def check_boot_param(name, value):
    if not BOOT_PARAM.fullmatch(value):
        return ("%s item %r is not one kernel parameter; give each parameter as its own item, in printable "
                "ASCII without blanks, quotes, or any of \\ ; { } $ | & < > # `" % (name, value))
    return None


def check_plain_text(name, value):
    """Free text (a password, a description): anything but control characters."""
    if _CONTROL.search(value):
        return "%s holds a control character (a newline, tab or the like); remove it" % name
    return None
