"""The AWX execution environment, built offline from ee/execution-environment.yml
with ansible-builder and podman, and run with ansible-navigator.

usage:
  execution_environment.py build                 build (or reuse) the image; print its name
  execution_environment.py contents IMAGE        print what the image holds, as docs/awx.md lists it
  execution_environment.py docs                  build, then rewrite that list in docs/awx.md
  execution_environment.py navigator ARGS...     ansible-navigator with this machine's podman settings

No registry is reachable here, so the definition a user builds against a
registry (base image quay.io/centos/centos:stream9) is built through a
derived copy that changes only where things come from:

- the base image is Debian 12, made once with debootstrap and `podman
  import` (cached), with a dnf-like front end to apt (`ee-apt`) as the
  package manager ansible-builder calls;
- Python packages (ansible-core, ansible-runner, the EE's requirements and
  what ansible-builder's own stages install) come from wheels downloaded on
  this machine with the pinned versions (pip in the build runs with
  PIP_NO_INDEX): HTTPS from inside a build container is not trusted here,
  and this machine's certificates are not copied into images;
- the collections come from tarballs: liveclone.core built from this
  checkout, community.general and ansible.posix packed from the copies the
  pinned `ansible` package installed in the virtual environment.

podman runs with a configuration and an image store of its own under
$LIVECLONE_CACHE/ee (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF): runc instead of
crun (which fails on this kind's hybrid cgroups), file-descriptor limits it
can set, and never the host's own podman storage or settings.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CACHE = os.path.join(os.environ.get("LIVECLONE_CACHE", "/var/cache/liveclone"), "ee")
REQUIREMENTS = os.path.join(REPO, "requirements.txt")
BASE_PACKAGES = ("python3", "python3-pip", "python3-venv", "python3.11", "ca-certificates", "openssh-client")
# Raise when the way the base image is made changes.
BASE_LAYOUT = 1
IMAGE = "localhost/liveclone-ee"
# ansible-builder's own stages install these (bindep and its parsers in the
# builder stage, dumb-init as the image's init), besides the definition's.
BUILDER_PACKAGES = ("bindep", "PyYAML", "packaging", "dumb-init==1.2.5")
# A dnf-like front end to apt: ansible-builder calls PKGMGR install -y PKGS and PKGMGR clean all.
APT_FRONT_END = """#!/bin/sh
# ansible-builder's package manager calls, carried out by apt-get.
set -e
command=$1; shift
case $command in
install)
    packages=""
    for word in "$@"; do
        case $word in -*) ;; *) packages="$packages $word" ;; esac
    done
    [ -z "$packages" ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $packages ;;
clean) apt-get clean ;;
upgrade) ;;
*) echo "ee-apt: unsupported command $command" >&2; exit 1 ;;
esac
"""
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
events_logger = "file"
cgroup_manager = "cgroupfs"
"""
STORAGE_CONF = """[storage]
driver = "overlay"
graphroot = "%s"
runroot = "%s"
"""


def venv_tool(name):
    """A command of this Python's virtual environment (the pinned versions)."""
    return os.path.join(os.path.dirname(sys.executable), name)


def log(text):
    print(text, file=sys.stderr, flush=True)


def podman_env():
    """The environment for podman, ansible-builder and ansible-navigator: our own configuration and store."""
    os.makedirs(CACHE, exist_ok=True)
    conf = os.path.join(CACHE, "containers.conf")
    storage = os.path.join(CACHE, "storage.conf")
    for path, text in ((conf, CONTAINERS_CONF),
                       (storage, STORAGE_CONF % (os.path.join(CACHE, "storage"), "/run/liveclone-ee"))):
        with open(path, "a+") as handle:
            handle.seek(0)
            if handle.read() != text:
                handle.seek(0)
                handle.truncate()
                handle.write(text)
    return dict(os.environ, CONTAINERS_CONF=conf, CONTAINERS_STORAGE_CONF=storage)


def run(argv, **kwargs):
    kwargs.setdefault("env", podman_env())
    return subprocess.run(argv, check=True, text=True, **kwargs)


def image_exists(name):
    return subprocess.run(["podman", "image", "exists", name], env=podman_env(), check=False).returncode == 0


def digest(*parts):
    hashed = hashlib.sha256()
    for part in parts:
        hashed.update(part if isinstance(part, bytes) else str(part).encode())
        hashed.update(b"\0")
    return hashed.hexdigest()[:12]


def base_image():
    """The Debian 12 base image, made once with debootstrap and imported."""
    name = "localhost/liveclone-ee-base:bookworm-" + digest(BASE_LAYOUT, *BASE_PACKAGES, APT_FRONT_END)
    if image_exists(name):
        return name
    log("making the base image %s with debootstrap" % name)
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="liveclone-ee-base-") as work:
        tree = os.path.join(work, "tree")
        logfile = os.path.join(work, "debootstrap.log")
        with open(logfile, "w") as handle:
            done = subprocess.run(["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
                                   "bookworm", tree, "http://deb.debian.org/debian"], stdout=handle,
                                  stderr=subprocess.STDOUT, check=False)
        if done.returncode:
            with open(logfile) as handle:
                raise SystemExit("debootstrap failed:\n" + "".join(handle.readlines()[-20:]))
        front_end = os.path.join(tree, "usr/local/bin/ee-apt")
        with open(front_end, "w") as handle:
            handle.write(APT_FRONT_END)
        os.chmod(front_end, 0o755)
        # apt's lists stay: ee-apt installs what bindep asks for from the image's own lists.
        subprocess.run(["chroot", tree, "apt-get", "clean"], check=True)
        tar = subprocess.Popen(["tar", "-C", tree, "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        run(["podman", "import", "--change", "CMD [\"/bin/bash\"]", "-", name], stdin=tar.stdout,
            stdout=subprocess.DEVNULL)
        if tar.wait():
            raise SystemExit("tar of the base tree failed")
        # The tree holds device nodes debootstrap made; TemporaryDirectory removes it (nothing is mounted there).
    return name


def pins():
    """requirements.txt's pins, by canonical name: the one pinned Python set."""
    with open(REQUIREMENTS) as handle:
        return dict(line.strip().split("==") for line in handle if "==" in line)


def canonical(name):
    """A package's name as PEP 503 compares it (PyYAML, pyyaml and py_yaml are one)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def python_requirements(definition):
    """The pinned requirement lines the build installs with pip: the
    collection's own (meta/), ansible-core and ansible-runner, and ansible-builder's."""
    pinned = pins()
    with open(os.path.join(REPO, "meta/ee-requirements.txt")) as handle:
        wanted = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    wanted += [definition["dependencies"]["ansible_core"]["package_pip"],
               definition["dependencies"]["ansible_runner"]["package_pip"]]
    for package in BUILDER_PACKAGES:
        wanted.append(package if "==" in package else "%s==%s" % (package, pinned[package]))
    return wanted


def unpinned_wheels(names, requirements, pinned):
    """The wheel files among names whose package and version no pin names:
    requirements.txt's, or a requirement line's own (dumb-init's)."""
    allowed = {canonical(name): version for name, version in pinned.items()}
    allowed.update({canonical(line.split("==")[0]): line.split("==")[1] for line in requirements})
    # A wheel's name is NAME-VERSION-...whl, NAME with its dashes as underscores.
    return sorted(name for name in names
                  if allowed.get(canonical(name.split("-")[0])) != name.split("-")[1])


def wheels(requirements):
    """A directory of wheels for the requirements and every package below
    them, each at requirements.txt's pin (cached by the requirements and the pins)."""
    with open(REQUIREMENTS, "rb") as handle:
        directory = os.path.join(CACHE, "wheels-" + digest(handle.read(), *requirements))
    if not os.path.isdir(directory):
        log("downloading the wheels into %s" % directory)
        os.makedirs(CACHE, exist_ok=True)
        partial = tempfile.mkdtemp(dir=CACHE, prefix=".wheels-")
        # requirements.txt as constraints: a dependency below the requirements gets its pin, not
        # whatever the registry serves that day.
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                               "--only-binary", ":all:", "--constraint", REQUIREMENTS, "--dest", partial]
                              + list(requirements), capture_output=True, text=True, check=False)
        if done.returncode:
            shutil.rmtree(partial)
            raise SystemExit("pip download failed:\n" + done.stderr[-3000:])
        unpinned = unpinned_wheels(os.listdir(partial), requirements, pins())
        if unpinned:
            shutil.rmtree(partial)
            raise SystemExit("the execution environment would hold packages requirements.txt does not pin: %s; "
                             "pin them there (pip install -r requirements.in in the venv, then pip freeze --all "
                             "--exclude pip > requirements.txt)" % ", ".join(unpinned))
        os.rename(partial, directory)
    return directory


def collection_tarballs(out):
    """liveclone.core built from the checkout, and the other collections packed
    from the copies the pinned `ansible` package installed; returns their file names."""
    source = os.environ.get("LIVECLONE_COLLECTION_SOURCE", REPO)
    run([venv_tool("ansible-galaxy"), "collection", "build", "--force",
         "--output-path", out, source], env=dict(os.environ, ANSIBLE_NOCOLOR="1"), stdout=subprocess.DEVNULL)
    # The `ansible` package's copies, in this Python's site-packages.
    installed = os.path.join(sysconfig.get_paths()["purelib"], "ansible_collections")
    for namespace, name in (("community", "general"), ("ansible", "posix")):
        pack_installed(os.path.join(installed, namespace, name), out)
    return sorted(os.path.basename(path) for path in glob.glob(os.path.join(out, "*.tar.gz")))


def pack_installed(source, out):
    """A collection artifact of an installed copy. pip's copy lacks some files
    its FILES.json lists (CI settings), which ansible-galaxy would refuse, so
    FILES.json is written anew from what is there, and MANIFEST.json's checksum of it."""
    files, entries = [{"name": ".", "ftype": "dir", "chksum_type": None, "chksum_sha256": None, "format": 1}], []
    for directory, dirs, names in os.walk(source):
        dirs[:] = sorted(name for name in dirs if name != "__pycache__")
        relative = os.path.relpath(directory, source)
        for name in dirs:
            path = os.path.normpath(os.path.join(relative, name))
            files.append({"name": path, "ftype": "dir", "chksum_type": None, "chksum_sha256": None, "format": 1})
            entries.append(path)
        for name in sorted(names):
            path = os.path.normpath(os.path.join(relative, name))
            if path in ("MANIFEST.json", "FILES.json"):
                continue
            with open(os.path.join(directory, name), "rb") as handle:
                checksum = hashlib.sha256(handle.read()).hexdigest()
            files.append({"name": path, "ftype": "file", "chksum_type": "sha256", "chksum_sha256": checksum,
                          "format": 1})
            entries.append(path)
    files_json = json.dumps({"files": files, "format": 1}, indent=4).encode()
    with open(os.path.join(source, "MANIFEST.json")) as handle:
        manifest = json.load(handle)
    manifest["file_manifest_file"]["chksum_sha256"] = hashlib.sha256(files_json).hexdigest()
    info = manifest["collection_info"]
    path = os.path.join(out, "%s-%s-%s.tar.gz" % (info["namespace"], info["name"], info["version"]))
    # gzip without a time stamp: the same copy gives the same bytes (the image's tag).
    with gzip.GzipFile(path, "wb", mtime=0) as packed, tarfile.open(fileobj=packed, mode="w") as tar:
        for member, data in (("MANIFEST.json", json.dumps(manifest, indent=4).encode()), ("FILES.json", files_json)):
            header = tarfile.TarInfo(member)
            header.size, header.mode = len(data), 0o644
            tar.addfile(header, io.BytesIO(data))
        for entry in entries:
            tar.add(os.path.join(source, entry), arcname=entry, recursive=False)


def tarball_digest(path):
    """A digest of a collection tarball's members (names and contents), not of
    its bytes: ansible-galaxy's tarballs carry the time they were made."""
    hashed = hashlib.sha256()
    with tarfile.open(path) as tar:
        for member in sorted(tar.getmembers(), key=lambda member: member.name):
            hashed.update(member.name.encode() + b"\0")
            if member.isfile():
                hashed.update(tar.extractfile(member).read())
    return hashed.hexdigest()


def derived_definition(definition, base, tarballs):
    """The registry definition with only the sources changed (see the module's docstring)."""
    derived = json.loads(json.dumps(definition))
    derived["images"]["base_image"]["name"] = base
    options = derived.setdefault("options", {})
    options["package_manager_path"] = "/usr/local/bin/ee-apt"
    # Debian's python3-pip is in the base image; its Python has no ensurepip.
    options["skip_pip_install"] = True
    options["tags"] = []
    derived["dependencies"]["galaxy"] = {"collections": [
        {"name": "/tmp/liveclone-collections/" + name, "type": "file"} for name in tarballs]}
    derived["additional_build_files"] = [{"src": "wheels", "dest": "wheels"},
                                         {"src": "collections", "dest": "collections"}]
    steps = derived.setdefault("additional_build_steps", {})
    steps["prepend_base"] = ["COPY _build/wheels/ /tmp/liveclone-wheels/",
                             "ENV PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/liveclone-wheels"]
    steps["prepend_galaxy"] = ["COPY _build/collections/ /tmp/liveclone-collections/",
                               "ENV ANSIBLE_GALAXY_CLI_COLLECTION_OPTS=--offline"]
    steps["append_final"] = ["RUN rm -rf /tmp/liveclone-wheels"]
    return derived


def build():
    with open(os.path.join(REPO, "ee/execution-environment.yml")) as handle:
        definition = yaml.safe_load(handle)
    base = base_image()
    requirements = python_requirements(definition)
    wheel_dir = wheels(requirements)
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="liveclone-ee-build-") as work:
        os.makedirs(os.path.join(work, "collections"))
        tarballs = collection_tarballs(os.path.join(work, "collections"))
        shutil.copytree(wheel_dir, os.path.join(work, "wheels"))
        derived = derived_definition(definition, base, tarballs)
        path = os.path.join(work, "execution-environment.yml")
        with open(path, "w") as handle:
            yaml.safe_dump(derived, handle, sort_keys=False)
        # The tag changes with the definition, the collections and the Python set, and only with them.
        tag = IMAGE + ":" + digest(json.dumps(derived, sort_keys=True), *(
            tarball_digest(os.path.join(work, "collections", name)) for name in tarballs),
            *sorted(os.listdir(wheel_dir)))
        if image_exists(tag):
            return tag
        log("building %s with ansible-builder" % tag)
        with open(os.path.join(work, "build.log"), "w") as handle:
            done = subprocess.run([venv_tool("ansible-builder"), "build", "--file", path, "--context",
                                   os.path.join(work, "context"), "--tag", tag, "--container-runtime", "podman",
                                   "--extra-build-cli-args=--network=host --pull=never", "--verbosity", "2"],
                                  env=podman_env(), cwd=work, stdout=handle, stderr=subprocess.STDOUT, check=False)
        if done.returncode:
            with open(os.path.join(work, "build.log")) as handle:
                raise SystemExit("ansible-builder failed:\n" + "".join(handle.readlines()[-40:]))
    # The store keeps the newest build (and the cached base image), not one image per change.
    listed = run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", "reference=" + IMAGE],
                 capture_output=True).stdout.split()
    older = [name for name in listed if name != tag]
    if older:
        run(["podman", "rmi"] + older, stdout=subprocess.DEVNULL)
    run(["podman", "image", "prune", "--force"], stdout=subprocess.DEVNULL)
    return tag


def contents(image):
    """What the image holds, as Markdown: Python, ansible-core, the collections, the Python packages."""
    def inside(*argv):
        return run(["podman", "run", "--rm", "--network=none", image] + list(argv), capture_output=True).stdout

    python = inside("python3", "--version").strip()
    collections = json.loads(inside("ansible-galaxy", "collection", "list", "--format", "json"))
    found = {}
    for path in collections.values():
        for name, info in path.items():
            # ansible._protomatter and the like are ansible-core's own.
            if not name.startswith("ansible._"):
                found.setdefault(name, info["version"])
    packages = json.loads(inside("python3", "-m", "pip", "list", "--format", "json"))
    return "\n".join([
        "- %s (the base image's)" % python,
        "- Python packages: " + ", ".join("%s %s" % (item["name"], item["version"]) for item in sorted(
            packages, key=lambda item: item["name"].lower()) if item["name"].lower() in WATCHED_PACKAGES),
        "- collections: " + ", ".join("%s %s" % item for item in sorted(found.items()))]) + "\n"


# The Python packages docs/awx.md lists (Debian's own in the base image are not ours to pin).
WATCHED_PACKAGES = {"ansible-core", "ansible-runner", "jmespath", "jinja2", "pyyaml", "cryptography", "dumb-init"}


@contextlib.contextmanager
def message_queue_directory():
    """ansible-navigator refuses to start podman without a /dev/mqueue
    directory (ansible-runner passes --ipc=host); made for the run when missing."""
    made = False
    if not os.path.isdir("/dev/mqueue"):
        os.mkdir("/dev/mqueue")
        made = True
    try:
        yield
    finally:
        if made:
            os.rmdir("/dev/mqueue")


def navigator(argv, **kwargs):
    """ansible-navigator's CompletedProcess; its exit status is the caller's to judge.
    No ANSIBLE_* variable of this machine reaches the container (ansible-runner
    passes them on): the image's own collections and settings are what run."""
    env = {name: value for name, value in podman_env().items() if not name.startswith("ANSIBLE_")}
    with message_queue_directory():
        return subprocess.run([venv_tool("ansible-navigator")] + list(argv), env=env, check=False, **kwargs)


DOCS = os.path.join(REPO, "docs/awx.md")
DOCS_BEGIN = "<!-- execution environment contents: lab/execution_environment.py docs -->"
DOCS_END = "<!-- end of the execution environment contents -->"


def write_docs(image):
    """Rewrite the image's contents in docs/awx.md (a test compares them with the built image)."""
    with open(DOCS) as handle:
        text = handle.read()
    start, end = text.index(DOCS_BEGIN) + len(DOCS_BEGIN), text.index(DOCS_END)
    with open(DOCS, "w") as handle:
        handle.write(text[:start] + "\n" + contents(image) + text[end:])


def release_store():
    """podman's overlay driver bind-mounts its own directory of our store and
    leaves it mounted when podman exits: unmounted here, so that a run leaves
    no mount behind. Only mounts under our store are touched."""
    store = os.path.join(CACHE, "storage")
    with open("/proc/self/mountinfo") as handle:
        points = [line.split()[4] for line in handle]
    for point in sorted({p for p in points if p == store or p.startswith(store + "/")}, key=len, reverse=True):
        subprocess.run(["umount", point], check=True)


def main(argv):
    try:
        dispatch(argv)
    finally:
        release_store()


def dispatch(argv):
    if argv[:1] == ["build"] and len(argv) == 1:
        print(build())
    elif argv[:1] == ["docs"] and len(argv) == 1:
        write_docs(build())
    elif argv[:1] == ["contents"] and len(argv) == 2:
        sys.stdout.write(contents(argv[1]))
    elif argv[:1] == ["navigator"]:
        raise SystemExit(navigator(argv[1:]).returncode)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
