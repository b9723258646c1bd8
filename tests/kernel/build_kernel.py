"""Build (once) the kernel and fetch (once) the QEMU that the iommufd tier boots.

Debian's own kernels are built without CONFIG_IOMMUFD, and bookworm's QEMU has neither a
scalable-mode VT-d with PASIDs nor vfio-user, so both come from Debian sid, cached OUTSIDE
the checkout under /var/cache/pasid-broker (PBK_CACHE overrides), keyed by what went in:

- kernel-<sha>/bzImage: linux-source-<ver>, `make allnoconfig` with
  tests/kernel/iommufd.config as KCONFIG_ALLCONFIG (only what the guest uses); <sha>
  hashes the base target, the config file and the source package version. The first
  build takes ~4 min on 2 cores (`nice -n 10 make -j2 bzImage`).
- qemu-<ver>/: qemu-system-x86 and the libraries it needs from sid, unpacked with
  `dpkg-deb -x`, run through their own ld.so (`qemu_command()`), so the host stays as is.
- libc-<ver>/: linux-libc-dev of the same kernel version, for the uapi header check.

Run as a script to warm the cache (`python3 tests/kernel/build_kernel.py all`). Needs root
(apt) and network to Debian; raises Unavailable with the reason otherwise.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

if __package__ in (None, ""):  # run as a script to warm the cache: the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests import apt

HERE = Path(__file__).resolve().parent
FRAGMENT = HERE / "iommufd.config"
# The config is this target with FRAGMENT forced on (in the cache key): a tinyconfig would
# also turn off what CPython, gRPC and SQLite need (futexes, epoll, /proc, ...).
BASE_CONFIG = "allnoconfig"
CACHE = Path(os.environ.get("PBK_CACHE", "/var/cache/pasid-broker"))
KERNEL_SERIES = "7.2"
SOURCE_PKG = f"linux-source-{KERNEL_SERIES}"
SID_SOURCES = Path("/etc/apt/sources.list.d/pasid-sid.sources")
SID_PIN = Path("/etc/apt/preferences.d/pasid-sid-pin")
# Libraries sid's qemu-system-x86 links against that bookworm's are too old for. The
# loader path puts these first, then the host's.
QEMU_PKGS = (
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
    "ipxe-qemu",
    "libc6",
)
BUILD_DEPS = (
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "make",
    "gcc",
    "xz-utils",
    "ccache",
)
# ccache's store, kept beside the kernels: a fragment change (a new cache key) rebuilds in
# a few minutes instead of the cold build's ten-plus, since most objects are unchanged.
CCACHE_DIR = CACHE / "ccache"


class Unavailable(Exception):
    """This machine cannot provide the kernel/QEMU; the message says why."""


def _log(msg: str) -> None:
    print(f"[build_kernel {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload,no-any-return]


def ensure_sid_source() -> None:
    """A sid apt source pinned at priority 1: nothing installs from it unless asked."""
    if SID_SOURCES.exists() and SID_PIN.exists():
        return
    if os.geteuid() != 0:
        raise Unavailable("needs Debian sid packages and is not root (cannot add the source)")
    SID_SOURCES.write_text(
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: sid\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    SID_PIN.write_text("Package: *\nPin: release n=sid\nPin-Priority: 1\n")
    r = apt.apt_get("update", "-qq", timeout=600)
    if r.returncode != 0:
        raise Unavailable(f"apt-get update failed: {r.stderr.strip()[-300:]}")


def sid_versions(pkgs: Iterable[str]) -> dict[str, str]:
    """Debian sid's version of each of `pkgs` that apt knows, in one apt-cache call (a
    call per package cost a cold run minutes: QEMU's closure is some 55 packages, each
    tried under several names)."""
    names = sorted(set(pkgs))
    if not names:
        return {}
    r = _run(["apt-cache", "madison", *names])
    found: dict[str, str] = {}
    for line in r.stdout.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) >= 3 and "sid" in parts[2]:
            found.setdefault(parts[0], parts[1])
    return found


def sid_version(pkg: str) -> str:
    version = sid_versions([pkg]).get(pkg)
    if version is None:
        raise Unavailable(f"{pkg}: no version from Debian sid in apt's lists")
    return version


def _download(pkg: str, version: str, into: Path) -> Path:
    return _download_all({pkg: version}, into)[0]


def _download_all(versions: dict[str, str], into: Path) -> list[Path]:
    """The .deb of each package at its version, fetched by one `apt-get download`."""
    into.mkdir(parents=True, exist_ok=True)
    wanted = [f"{pkg}={v}" for pkg, v in sorted(versions.items())]
    lock = f"DPkg::Lock::Timeout={apt.LOCK_WAIT}"
    r = _run(["apt-get", "-o", lock, "download", *wanted], cwd=into, timeout=1800)
    if r.returncode != 0:
        raise Unavailable(f"apt-get download {' '.join(wanted)}: {r.stderr.strip()[-300:]}")
    debs = []
    for pkg, v in sorted(versions.items()):
        found = sorted(into.glob(f"{pkg}_{v.replace(':', '%3a')}_*.deb"))
        if not found:
            raise Unavailable(f"apt-get download {pkg}={v}: no .deb appeared")
        debs.append(found[-1])
    return debs


def kernel_key(source_version: str) -> str:
    """What the kernel is made of: the base config target, the config file, the source."""
    h = hashlib.sha256()
    h.update(BASE_CONFIG.encode() + b"\n")
    h.update(FRAGMENT.read_bytes())
    h.update(source_version.encode())
    return h.hexdigest()[:16]


def cached_kernel() -> Path | None:
    """The bzImage for the current config, if any source version of it was built (no
    network)."""
    for d in sorted(CACHE.glob("kernel-*")):
        meta = d / "source-version"
        if (
            (d / "bzImage").exists()
            and meta.exists()
            and d.name == f"kernel-{kernel_key(meta.read_text().strip())}"
        ):
            return d / "bzImage"
    return None


def build_kernel() -> Path:
    """Return the cached bzImage, building it first if the fragment or source changed.
    One build at a time: a second caller (another test run, the warm-up script) waits
    for the first one's kernel instead of running make in the same source tree."""
    found = cached_kernel()
    if found is not None:
        return found
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "kernel-build.lock", "w") as lock:
        _log("waiting for the kernel build lock")
        fcntl.flock(lock, fcntl.LOCK_EX)
        return cached_kernel() or _build_kernel()


def _build_kernel() -> Path:
    ensure_sid_source()
    why = apt.install(*BUILD_DEPS)
    for tool in ("flex", "bison", "bc", "make", "gcc"):
        if not shutil.which(tool):
            raise Unavailable(f"kernel build needs {tool}" + (f" ({why})" if why else ""))
    version = sid_version(SOURCE_PKG)
    out = CACHE / f"kernel-{kernel_key(version)}"
    src_root = CACHE / f"src-{version}"
    tree = src_root / f"linux-source-{KERNEL_SERIES}"
    if not (tree / "Makefile").exists():
        _log(f"downloading {SOURCE_PKG} {version}")
        deb = _download(SOURCE_PKG, version, CACHE / "debs")
        unpack = src_root / "deb"
        shutil.rmtree(unpack, ignore_errors=True)
        unpack.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpack)], check=True)
        (tarball,) = (unpack / "usr" / "src").glob("linux-source-*.tar.*")
        _log(f"unpacking {tarball.name}")
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(src_root)], check=True)
        shutil.rmtree(unpack, ignore_errors=True)
    t0 = time.monotonic()

    cc = ["CC=ccache gcc"] if shutil.which("ccache") else []
    env = {**os.environ, "CCACHE_DIR": str(CCACHE_DIR), "CCACHE_MAXSIZE": "2G"}

    def make(*args: str) -> None:
        cmd = ["nice", "-n", "10", "make", "-C", str(tree), *cc, *args]
        _log(" ".join(cmd))
        r = subprocess.run(cmd, check=False, env=env)
        if r.returncode != 0:
            raise Unavailable(f"kernel build failed: {' '.join(args)} exited {r.returncode}")

    # Everything else off: the symbols the file sets, what they select, and the defaults
    # of what only CONFIG_EXPERT may turn off. An unmet dependency drops a line silently,
    # hence the check below.
    make(f"KCONFIG_ALLCONFIG={FRAGMENT}", BASE_CONFIG)
    config = (tree / ".config").read_text()
    missing = [
        line
        for line in FRAGMENT.read_text().splitlines()
        if line.startswith("CONFIG_") and line.endswith("=y") and line not in config
    ]
    if missing:
        raise Unavailable(f"the kernel config dropped {', '.join(missing)} (dependencies?)")
    make("-j2", "bzImage")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(tree / "arch" / "x86" / "boot" / "bzImage", out / "bzImage.tmp")
    shutil.copy2(tree / ".config", out / "config")
    (out / "source-version").write_text(version + "\n")
    (out / "bzImage.tmp").rename(out / "bzImage")
    _log(f"kernel built in {time.monotonic() - t0:.0f} s: {out / 'bzImage'}")
    return out / "bzImage"


def _unpacked(prefix: str, pkgs: tuple[str, ...], anchor: str) -> Path:
    """sid packages unpacked with dpkg-deb -x under CACHE/<prefix>-<version of pkgs[0]>.
    One unpack of a prefix at a time: pytest-xdist workers (the uapi test and the kernel
    tier) ask for the same headers at once on a cold cache, and shared one .tmp dir."""
    found = _unpacked_already(prefix, anchor)
    if found is not None:
        return found
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{prefix}-unpack.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _unpacked_already(prefix, anchor) or _unpack(prefix, pkgs, anchor)


def _unpacked_already(prefix: str, anchor: str) -> Path | None:
    for d in sorted(CACHE.glob(f"{prefix}-*")):
        if (d / anchor).exists():
            return d
    return None


def _unpack(prefix: str, pkgs: tuple[str, ...], anchor: str) -> Path:
    ensure_sid_source()
    version = sid_version(pkgs[0])
    dest = CACHE / f"{prefix}-{version.replace(':', '_')}"
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    versions = sid_versions(pkgs)
    lacking = [p for p in pkgs if p not in versions]
    if lacking:
        raise Unavailable(f"{', '.join(lacking)}: no version from Debian sid in apt's lists")
    for deb in _download_all(versions, CACHE / "debs"):
        _log(f"unpacking {deb.name}")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    if not (tmp / anchor).exists():
        raise Unavailable(f"{pkgs[0]} {version}: {anchor} missing after unpacking")
    tmp.rename(dest)
    return dest


def linux_libc_dev() -> Path:
    """The uapi headers of the kernel the tier boots (…/usr/include)."""
    d = _unpacked("libc", ("linux-libc-dev",), "usr/include/linux/iommufd.h")
    return d / "usr" / "include"


def qemu_root() -> Path:
    """sid's QEMU plus sid's build of every library it loads (bookworm's are too old for it:
    e.g. nettle_sm4_crypt), resolved until no library comes from the host any more."""
    root = _unpacked("qemu", QEMU_PKGS, "usr/bin/qemu-system-x86_64")
    done = root / ".libs-complete"
    if done.exists():
        return root
    tried: set[str] = set()
    for _ in range(10):
        missing, from_host = _libs(root)
        pkgs: dict[str, str] = {}
        for lib, found in _lib_packages(missing | from_host).items():
            if found is None and lib in missing:
                raise Unavailable(f"QEMU needs {lib}: no sid package found for it")
            if found is not None and found[0] not in tried:
                pkgs[found[0]] = found[1]
        if not pkgs:
            break
        tried |= pkgs.keys()
        for deb in _download_all(pkgs, CACHE / "debs"):
            _log(f"unpacking {deb.name} for QEMU")
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    missing, _ = _libs(root)
    if missing:
        raise Unavailable(f"QEMU still misses libraries: {', '.join(sorted(missing))}")
    done.write_text("")
    return root


def _lib_packages(libs: set[str]) -> dict[str, tuple[str, str] | None]:
    """Each soname's sid package and version, guessed (libfoo-1.0.so.3 -> libfoo-1.0-3 or
    libfoo3; the host's owner by dpkg -S first), with one apt-cache call for all."""
    cands: dict[str, list[str]] = {}
    for lib in sorted(libs):
        stem, _, ver = lib.partition(".so.")
        ver = ver.split(".")[0]
        names = [f"{stem}{ver}", f"{stem}-{ver}", f"{stem}{ver}t64", f"{stem}-{ver}t64"]
        owner = _run(["dpkg", "-S", f"*/{lib}"])
        if owner.returncode == 0:
            pkg = owner.stdout.split(":")[0].strip()
            names = [pkg, f"{pkg}t64", *names]
        cands[lib] = names
    versions = sid_versions(n for names in cands.values() for n in names)
    return {
        lib: next(((n, versions[n]) for n in names if n in versions), None)
        for lib, names in cands.items()
    }


def _ld_so(root: Path) -> Path:
    return root / "usr" / "lib" / "x86_64-linux-gnu" / "ld-linux-x86-64.so.2"


def _lib_path(root: Path) -> str:
    dirs = [root / "lib" / "x86_64-linux-gnu", root / "usr" / "lib" / "x86_64-linux-gnu"]
    host = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"]
    return ":".join([str(d) for d in dirs] + host)


def _libs(root: Path) -> tuple[set[str], set[str]]:
    """Sonames QEMU needs (NEEDED, transitively): (found nowhere, found only on the host)."""
    dirs = [Path(d) for d in _lib_path(root).split(":")]
    seen: set[str] = set()
    missing: set[str] = set()
    host: set[str] = set()
    todo = [root / "usr" / "bin" / "qemu-system-x86_64"]
    while todo:
        r = _run(["readelf", "-d", str(todo.pop())])
        for line in r.stdout.splitlines():
            if "(NEEDED)" not in line:
                continue
            lib = line.split("[", 1)[1].rstrip("]")
            if lib in seen:
                continue
            seen.add(lib)
            found = next((d / lib for d in dirs if (d / lib).exists()), None)
            if found is None:
                missing.add(lib)
                continue
            if not str(found).startswith(str(root)):
                host.add(lib)
            todo.append(found)
    return missing, host


def qemu_command(root: Path) -> list[str]:
    """argv prefix that runs sid's QEMU through its own loader, with its firmware."""
    return [
        str(_ld_so(root)),
        "--library-path",
        _lib_path(root),
        str(root / "usr" / "bin" / "qemu-system-x86_64"),
        "-L",
        str(root / "usr" / "share" / "qemu"),
        "-L",
        str(root / "usr" / "share" / "seabios"),
    ]


def main(argv: list[str]) -> int:
    what = argv[1] if len(argv) > 1 else "all"
    try:
        if what in ("all", "qemu"):
            root = qemu_root()
            r = _run([*qemu_command(root), "--version"])
            _log(f"qemu: {root} {r.stdout.splitlines()[0] if r.stdout else r.stderr[-300:]}")
        if what in ("all", "headers"):
            _log(f"headers: {linux_libc_dev()}")
        if what in ("all", "kernel"):
            _log(f"kernel: {build_kernel()}")
    except Unavailable as exc:
        _log(f"UNAVAILABLE: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
