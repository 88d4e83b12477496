# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Secure Boot for live_iso: the signed chain the image's own distribution
provides (shim, the signed CD GRUB, MokManager, a signed kernel), read beneath
the image's root and never from the build host; what it lacks; whether shim's
SBAT level lets that GRUB and kernel boot; and what the manifest reports."""

from __future__ import annotations

from dataclasses import dataclass

from .._common.pe import PeError, is_signed, sbat_entries, sbat_levels, sbat_violations
from .desired import IsoError
from .source import file_in_tree, installed_packages, kernels, read_bounded

# Where the Debian family's packages put each piece (the first found is used).
SHIM_PATHS = ("usr/lib/shim/shimx64.efi.signed",)
# gcdx64 is GRUB's monolithic image for CD and USB: everything the menu uses is built in.
GRUB_PATHS = ("usr/lib/grub/x86_64-efi-signed/gcdx64.efi.signed",)
# Debian ships MokManager in shim-helpers-amd64-signed, Ubuntu in shim-signed.
MOK_MANAGER_PATHS = ("usr/lib/shim/mmx64.efi.signed", "usr/lib/shim/mmx64.efi")
PACKAGES = {"shim": "shim-signed", "grub": "grub-efi-amd64-signed", "mok_manager": "shim-helpers-amd64-signed"}
# shim 15.8 (February 2024) is the first that firmware and shims with the
# 2024 SBAT revocations (shim,4) still load.
SBAT_REVOKED_BEFORE = (15, 8)
# The SBAT policy a shim applies unless told otherwise (mokutil --set-sbat-policy).
DEFAULT_POLICY = "previous"
# The most read of shim, GRUB or a kernel (a signed kernel is 8 to 15 MiB, shim 1, GRUB 4): a larger one is refused.
PE_LIMIT = 64 << 20


@dataclass
class Chain:
    """The signed pieces found in a tree, as link-free paths inside it (None where missing)."""

    shim: str | None
    grub: str | None
    mok_manager: str | None
    kernel: str | None
    kernel_release: str | None
    kernel_signed: bool

    def missing_packages(self):
        return [PACKAGES[name] for name in ("shim", "grub", "mok_manager") if getattr(self, name) is None]


def find_chain(tree, where):
    def first(paths):
        for path in paths:
            found = file_in_tree(tree, path, where)
            if found:
                return found
        return None

    found = kernels(tree, where)
    release, kernel, _initrd = found[-1] if found else (None, None, None)
    signed = bool(kernel) and is_signed(_read_pe(tree, kernel, where))
    # MokManager is optional where the distribution has no helpers package (Ubuntu ships it in shim-signed).
    return Chain(first(SHIM_PATHS), first(GRUB_PATHS), first(MOK_MANAGER_PATHS), kernel, release, signed)


def decide(desired, tree, warnings):
    """Before the copy: (whether the ISO gets the signed chain, the packages to
    install into the image for it). IsoError when secure_boot is required and
    the source cannot give it, or when its pieces cannot boot together."""
    if desired.secure_boot == "off":
        return False, []
    chain = find_chain(tree, "the source")
    fallback = ("the ISO gets an unsigned GRUB and boots on UEFI only with Secure Boot off", "or set "
                "secure_boot: off to build without it")
    if chain.kernel and not chain.kernel_signed:
        problem = ("the source's kernel /%s carries no signature, and shim boots only a signed kernel; install the "
                   "distribution's signed kernel in the source (linux-image-amd64 on Debian)" % chain.kernel)
        if desired.secure_boot == "required":
            raise IsoError("secure_boot is required, but %s, %s" % (problem, fallback[1]))
        warnings.append("%s: %s" % (fallback[0], problem))
        return False, []
    missing = chain.missing_packages()
    # MokManager alone missing is not worth an install: shim boots without it.
    if missing and missing != [PACKAGES["mok_manager"]]:
        if desired.install_missing:
            return True, missing
        problem = "the source lacks %s (%s)" % (" and ".join(_piece_names(chain)), ", ".join(missing))
        if desired.secure_boot == "required":
            raise IsoError("secure_boot is required, but %s; install them in the source (apt-get install %s), or "
                           "set install_missing: true to install them into the image from its own repositories, %s"
                           % (problem, " ".join(missing), fallback[1]))
        warnings.append("%s: %s; install them in the source, or set install_missing: true" % (fallback[0], problem))
        return False, []
    inspect(tree, chain, "the source")
    return True, []


def _read_pe(tree, relative, where):
    """The bytes of a piece of the chain (read_bounded to PE_LIMIT); b"" if it is gone."""
    try:
        return read_bounded(tree, relative, PE_LIMIT, "a kernel or EFI binary", where) or b""
    except IsoError as error:
        raise IsoError("%s, or set secure_boot: off" % error) from None


def _sbat(tree, relative, where, levels=False):
    """(sbat_entries, sbat_levels if asked else {}) of a piece of the chain;
    IsoError naming the piece when it is no PE image this module can read."""
    data = _read_pe(tree, relative, where)
    try:
        return sbat_entries(data), sbat_levels(data) if levels else {}
    except PeError as error:
        raise IsoError("%s: /%s, a piece of the signed chain, is not a PE image (%s); reinstall shim-signed, "
                       "grub-efi-amd64-signed and the signed kernel, or set secure_boot: off"
                       % (where, relative, error)) from None


def _piece_names(chain):
    names = {"shim": "shim", "grub": "the signed GRUB", "mok_manager": "MokManager"}
    return [names[name] for name in ("shim", "grub", "mok_manager") if getattr(chain, name) is None]


def inspect(tree, chain, where):
    """The report of a complete chain: the packages' versions, the SBAT data;
    IsoError when a piece is missing or shim's default SBAT level refuses GRUB
    or the kernel. Returns (report, warnings)."""
    if chain.shim is None or chain.grub is None or chain.kernel is None or not chain.kernel_signed:
        raise IsoError("%s lacks a piece of the signed chain (shim %s, signed GRUB %s, signed kernel %s); install "
                       "shim-signed, grub-efi-amd64-signed and the signed kernel, or set secure_boot: off" % (
                           where, chain.shim or "missing", chain.grub or "missing",
                           chain.kernel if chain.kernel_signed else "missing"))
    installed = installed_packages(tree, where)
    shim_sbat, levels = _sbat(tree, chain.shim, where, levels=True)
    grub_sbat, _levels = _sbat(tree, chain.grub, where)
    kernel_sbat, _levels = _sbat(tree, chain.kernel, where)
    level = levels.get(DEFAULT_POLICY, {})
    for name, path, entries in (("GRUB", chain.grub, grub_sbat), ("the kernel", chain.kernel, kernel_sbat)):
        refused = sbat_violations(entries, level)
        if refused:
            raise IsoError(
                "%s: shim /%s refuses %s /%s by its SBAT level %s (%s); the two come from different updates: "
                "upgrade shim-signed and grub-efi-amd64-signed in the source together, or set secure_boot: off"
                % (where, chain.shim, name, path, level.get("sbat", "?"), ", ".join(
                    "%s generation %d, %d required" % item for item in refused)))
    shim_version = next((entry.version for component, entry in shim_sbat.items()
                         if component.startswith("shim.")), "")
    warnings = []
    if _version_tuple(shim_version) < SBAT_REVOKED_BEFORE or shim_sbat.get("shim", (0,))[0] < 4:
        warnings.append("shim %s in %s predates shim 15.8 and the SBAT revocations of 2024: machines that have "
                        "applied them refuse it (\"Verifying shim SBAT data failed\"); upgrade shim-signed in "
                        "the source" % (shim_version or "of unknown version", where))
    report = {
        "enabled": True,
        "shim": {"package": PACKAGES["shim"], "version": installed.get(PACKAGES["shim"]),
                 "shim_version": shim_version, "sbat": _generations(shim_sbat),
                 "sbat_level": {name: value.get("sbat") for name, value in sorted(levels.items())}},
        "grub": {"package": PACKAGES["grub"], "version": installed.get(PACKAGES["grub"]),
                 "sbat": _generations(grub_sbat)},
        "kernel": _kernel_package(installed, chain.kernel_release) | {"release": chain.kernel_release,
                                                                      "sbat": _generations(kernel_sbat)},
        "mok_manager": chain.mok_manager is not None,
    }
    return report, warnings


def _kernel_package(installed, release):
    for name in ("linux-image-%s" % release, "linux-image-%s-unsigned" % release):
        if name in installed:
            return {"package": name, "version": installed[name]}
    return {"package": None, "version": None}


def _generations(entries):
    return {component: entry.generation for component, entry in sorted(entries.items()) if component != "sbat"}


def _version_tuple(text):
    parts = []
    for part in text.split("."):
        # ASCII digits only: int() refuses "²", which str.isdigit takes, and numbers of 4300 digits.
        if not (part.isascii() and part.isdigit()) or len(part) > 9:
            break
        parts.append(int(part))
    return tuple(parts)


def describe(chain_report):
    """The operation's words for a report."""
    shim, grub, kernel = chain_report["shim"], chain_report["grub"], chain_report["kernel"]
    return ("made the UEFI boot image with the image's signed chain for Secure Boot: shim %s (SBAT shim,%s), "
            "GRUB %s (SBAT grub,%s), kernel %s %s" % (
                shim["shim_version"] or shim["version"], shim["sbat"].get("shim", "?"), grub["version"],
                grub["sbat"].get("grub", "?"), kernel["release"], kernel["version"] or "(signed)"))
