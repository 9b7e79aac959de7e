"""Building the "native" CPU kernels: compiler, flags, cache, and loading them into XLA.

The kernels' sources (``cpu_kernel.cc``, the op; ``cpu_stem_kernel.cc``, the attention stem;
``cpu_common.h``, what they share) ship with the package and build into one library, the
first time the op runs on CPU -- not when a layer is built, a model summarised or the
implementations listed -- with the machine's C++ compiler (``$CXX``, else ``c++``, ``g++`` or
``clang++``) against the FFI headers of the installed jaxlib, into a cache directory
(``$SASA_JAX_CACHE``, else ``~/.cache/sasa_jax``), keyed by the sources, the compiler, its
flags and the jaxlib version. Later processes load it from there. ``$SASA_JAX_CXXFLAGS`` adds
flags after the defaults (``-O0`` gives a quick unoptimised build, as the tests of the cache
use). Without a compiler, or with ``SASA_JAX_NATIVE=0``, the kernels are not offered and
``auto`` picks a pure-JAX implementation.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import jax

SOURCES = ("cpu_kernel.cc", "cpu_stem_kernel.cc")
HEADERS = ("cpu_common.h",)
FORWARD_TARGET = "sasa_local_attention_forward"
BACKWARD_TARGET = "sasa_local_attention_backward"
STEM_FORWARD_TARGET = "sasa_stem_attention_forward"
STEM_BACKWARD_TARGET = "sasa_stem_attention_backward"
# Each FFI target and the library symbol that implements it.
TARGETS = {
    FORWARD_TARGET: "SasaLocalAttentionForward",
    BACKWARD_TARGET: "SasaLocalAttentionBackward",
    STEM_FORWARD_TARGET: "SasaStemForward",
    STEM_BACKWARD_TARGET: "SasaStemBackward",
}


def _cache_dir() -> Path:
    if os.environ.get("SASA_JAX_CACHE"):
        return Path(os.environ["SASA_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sasa_jax"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _x86_flags() -> list[str]:
    """AVX2 and FMA where this CPU has them (the kernel's vectors are 8 floats either way)."""
    flags = ""
    try:
        if platform.system() == "Linux":
            flags = Path("/proc/cpuinfo").read_text()
        elif platform.system() == "Darwin":
            flags = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.lower()
    except OSError:
        return []
    words = set(flags.replace("\n", " ").split())
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= words else []


def compile_command(compiler: str, sources: list[Path], output: Path) -> list[str]:
    """The command that builds the kernels' shared library from ``sources`` (the ``.cc``
    files; the headers sit beside them)."""
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-w"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += _x86_flags()
    flags += os.environ.get("SASA_JAX_CXXFLAGS", "").split()
    include = jax.ffi.include_dir()
    return [compiler, *flags, f"-I{include}", *map(str, sources), "-o", str(output)]


def _sources() -> dict[str, bytes]:
    """Every file the library is built from, by name."""
    package = resources.files("sasa_jax.attention")
    return {name: package.joinpath(name).read_bytes() for name in (*SOURCES, *HEADERS)}


def _library_path(compiler: str, files: dict[str, bytes]) -> Path:
    """Where the library for these files, compiler, flags and jaxlib lives in the cache."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    probe = compile_command(compiler, [Path(name) for name in SOURCES], Path("out"))
    key = hashlib.sha256()
    parts = [name.encode() + b"\0" + text for name, text in files.items()]
    for part in (*parts, version.encode(), " ".join(probe).encode(), jax.__version__.encode()):
        key.update(part)
        key.update(b"\0")
    return _cache_dir() / f"sasa_cpu_kernel_{key.hexdigest()[:20]}.so"


def _build(compiler: str, files: dict[str, bytes], path: Path) -> None:
    """Compiles into a temporary file and moves it into place (safe for parallel builds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_bytes(text)
        sources = [Path(tmp) / name for name in SOURCES]
        out = Path(tmp) / path.name
        result = subprocess.run(
            compile_command(compiler, sources, out), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-2000:] or "the compiler failed")
        os.replace(out, path)


def switched_off() -> bool:
    """``SASA_JAX_NATIVE=0`` turns the kernel off."""
    return os.environ.get("SASA_JAX_NATIVE", "1") == "0"


@functools.cache
def can_build() -> bool:
    """Whether the kernel can be offered here without building it: not switched off, and a
    C++ compiler is on the PATH (a warning says so once when there is none)."""
    if switched_off():
        return False
    if _compiler() is None:
        warnings.warn(
            "sasa_jax: no C++ compiler found; the 'native' kernel is unavailable", stacklevel=2
        )
        return False
    return True


def attempted() -> bool:
    """Whether ``library()`` has been called in this process (it caches its result)."""
    return library.cache_info().currsize > 0


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel with its FFI targets registered: compiled on the first call (about
    15 s on 2 cores) into the cache, loaded from it afterwards. None where it cannot be built
    here (a warning says why) or ``SASA_JAX_NATIVE=0``."""
    if not can_build():
        return None
    compiler = _compiler()
    files = _sources()
    try:
        path = _library_path(compiler, files)
        if not path.exists():
            _build(compiler, files, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as err:
        warnings.warn(f"sasa_jax: the 'native' kernel could not be built: {err}", stacklevel=2)
        return None
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    lib.SasaWorkspace.restype = ctypes.c_int
    return lib
