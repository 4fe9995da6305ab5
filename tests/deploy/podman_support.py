"""Running deploy/docker-compose.yml with podman where no Docker engine runs and no
container registry can be reached:

- podman itself: `apt-get install podman runc`, and in /etc/containers/containers.conf
  `default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]` under [containers],
  `runtime = "runc"` and `cgroup_manager = "cgroupfs"` under [engine] (without them:
  crun's `setrlimit RLIMIT_NOFILE: Operation not permitted`, then `cgroups in hybrid
  mode not supported`);
- the Dockerfile's base image is made locally when it cannot be pulled: busybox, this
  machine's CPython tree at its own path and the shared libraries it needs, tarred and
  `podman import`ed under the name the Dockerfile's FROM uses;
- `podman system service` answers the Docker API that compose talks to, with
  DOCKER_BUILDKIT=0 (else compose tries to pull a buildkit image);
- podman schedules no healthchecks without systemd, so the test runs them itself
  (`podman healthcheck run`), for `depends_on: condition: service_healthy`.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

BASE_IMAGE = "docker.io/library/python:3.11-slim"
# CPU torch wheels this machine keeps, offered to pip inside the build (PyTorch's CPU
# index cannot be reached from here; PyPI's torch is the multi-GB CUDA build).
LOCAL_WHEELS = Path("/opt/wheels")
# Shared libraries that Python extension wheels (torch, grpcio) expect from the system.
SYSTEM_LIBS = ("libstdc++.so.6", "libgcc_s.so.1", "libz.so.1", "libutil.so.1", "librt.so.1",
               "libpthread.so.0", "libdl.so.2")
USERADD = """#!/bin/sh
# useradd for a busybox image: the options deploy/Dockerfile uses.
uid=""; home=1
while [ $# -gt 1 ]; do
  case "$1" in
    --uid|-u) uid="$2"; shift 2;;
    --create-home|-m) home=1; shift;;
    *) shift;;
  esac
done
name="$1"
echo "$name:x:$uid:$uid::/home/$name:/bin/sh" >> /etc/passwd
echo "$name:x:$uid:" >> /etc/group
mkdir -p "/home/$name" && chown "$uid:$uid" "/home/$name"
"""


def podman(*args: str, check: bool = True, timeout: float = 600,
           **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check,
                          timeout=timeout, **kwargs)


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def _ldd(path: Path) -> set[Path]:
    result = subprocess.run(["ldd", str(path)], capture_output=True, text=True)
    found = set()
    for match in re.finditer(r"(/\S+\.so[^\s]*)", result.stdout):
        found.add(Path(match.group(1)))
    return found


def _system_lib(name: str) -> Path | None:
    for folder in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64"):
        if (Path(folder) / name).exists():
            return Path(folder) / name
    return None


def make_base_image(name: str = BASE_IMAGE) -> None:
    """Make `name` from this machine's CPython (see the module's docstring)."""
    prefix = Path(sys.base_prefix)
    stdlib = Path(sysconfig.get_paths(vars={"base": sys.base_prefix})["stdlib"])
    python = prefix / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("no busybox: apt-get install busybox-static")
    libs = _ldd(python)
    for so in (stdlib / "lib-dynload").glob("*.so"):
        libs |= _ldd(so)
    for name_ in SYSTEM_LIBS:
        lib = _system_lib(name_)
        if lib is not None:
            libs.add(lib)
    site = stdlib / "site-packages"

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        path = "/" + info.name
        if "/__pycache__" in path or path.startswith(f"{stdlib}/test/"):
            return None
        if path.startswith(f"{site}/"):     # only pip and setuptools of the site packages
            top = path[len(f"{site}/"):].split("/")[0]
            if not top.startswith(("pip", "setuptools", "_distutils_hack",
                                   "distutils-precedence")):
                return None
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        def add_dir(path: str) -> None:
            info = tarfile.TarInfo(path.lstrip("/"))
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if path == "/tmp" else 0o755
            tar.addfile(info)

        for folder in ("/bin", "/sbin", "/usr", "/usr/bin", "/usr/sbin", "/etc", "/tmp",
                       "/root", "/home", "/var", "/var/tmp", "/dev", "/proc", "/sys"):
            add_dir(folder)
        tar.add(busybox, "bin/busybox")
        for applet in subprocess.run([busybox, "--list"], capture_output=True,
                                     text=True).stdout.split():
            if applet != "busybox":
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname = tarfile.SYMTYPE, "/bin/busybox"
                tar.addfile(link)
        for text, path, mode in ((USERADD, "usr/sbin/useradd", 0o755),
                                 ("root:x:0:0:root:/root:/bin/sh\n", "etc/passwd", 0o644),
                                 ("root:x:0:\n", "etc/group", 0o644)):
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(text.encode()), mode
            tar.addfile(info, io.BytesIO(text.encode()))
        tar.add(str(prefix), str(prefix).lstrip("/"), filter=keep)
        for lib in sorted(libs):
            if lib.is_relative_to(prefix):       # in the tree already
                continue
            real = lib.resolve()
            tar.add(str(real), str(lib).lstrip("/"))
        tar.add("/etc/ssl/certs/ca-certificates.crt", "etc/ssl/certs/ca-certificates.crt")
        if LOCAL_WHEELS.is_dir():
            for wheel in LOCAL_WHEELS.glob("*.whl"):
                tar.add(str(wheel), f"opt/wheels/{wheel.name}")
    changes = [f"ENV PATH={prefix}/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
               "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
               "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
               "CMD [\"python3\"]"]
    if LOCAL_WHEELS.is_dir():
        changes.append("ENV PIP_FIND_LINKS=/opt/wheels")
    args = ["import"]
    for change in changes:
        args += ["--change", change]
    subprocess.run(["podman", *args, "-", name], input=buffer.getvalue(),
                   capture_output=True, check=True, timeout=600)


class PodmanService:
    """`podman system service` on a private socket, for compose's Docker API calls."""

    def __init__(self, socket_path: Path):
        self.socket_path = socket_path
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> PodmanService:
        self.process = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{self.socket_path}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.socket_path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("podman system service did not start")
            time.sleep(0.1)
        return self

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket_path}",
                "DOCKER_BUILDKIT": "0"}

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
