"""cffi build script (out-of-line API mode) for pyhv's C core, ``pyhv._core``.

setup.py names ``ffibuilder`` here in ``cffi_modules``.  The cdef holds
declarations only; kernel constants are ``...`` so the compiler fills them in
from the machine's headers and ``csrc/uffd_compat.h``.
"""

import pathlib
import shutil
import subprocess

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ["uffd.c", "watchdog.c", "mce.c", "bench.c", "service.c", "engine.c", "nbd.c"]


def _libnbd() -> tuple[list, list, list]:
    """(macros, include dirs, libraries) for libnbd where its headers are
    installed (Debian's libnbd-dev: `make setup` installs it as root); else
    the core is built without it and NBD devices are refused in one line."""
    if shutil.which("pkg-config"):
        p = subprocess.run(["pkg-config", "--cflags-only-I", "libnbd"], capture_output=True,
                           text=True)  # fmt: skip
        if p.returncode == 0:
            inc = [f[2:] for f in p.stdout.split() if f.startswith("-I")]
            return [("PYHV_HAVE_NBD", "1")], inc, ["nbd"]
    if pathlib.Path("/usr/include/libnbd.h").exists():
        return [("PYHV_HAVE_NBD", "1")], [], ["nbd"]
    return [], [], []


NBD_MACROS, NBD_INCLUDES, NBD_LIBS = _libnbd()

CONSTANTS = """
UFFD_API UFFD_USER_MODE_ONLY
UFFD_EVENT_PAGEFAULT UFFD_EVENT_FORK UFFD_EVENT_REMAP UFFD_EVENT_REMOVE UFFD_EVENT_UNMAP
UFFD_PAGEFAULT_FLAG_WRITE UFFD_PAGEFAULT_FLAG_WP UFFD_PAGEFAULT_FLAG_MINOR
UFFD_FEATURE_PAGEFAULT_FLAG_WP UFFD_FEATURE_EVENT_FORK UFFD_FEATURE_EVENT_REMAP
UFFD_FEATURE_EVENT_REMOVE UFFD_FEATURE_EVENT_UNMAP UFFD_FEATURE_MISSING_SHMEM
UFFD_FEATURE_SIGBUS UFFD_FEATURE_THREAD_ID UFFD_FEATURE_MINOR_SHMEM
UFFD_FEATURE_EXACT_ADDRESS UFFD_FEATURE_WP_HUGETLBFS_SHMEM UFFD_FEATURE_WP_UNPOPULATED
UFFD_FEATURE_POISON UFFD_FEATURE_WP_ASYNC UFFD_FEATURE_MOVE
_UFFDIO_REGISTER _UFFDIO_UNREGISTER _UFFDIO_WAKE _UFFDIO_COPY _UFFDIO_ZEROPAGE
_UFFDIO_MOVE _UFFDIO_WRITEPROTECT _UFFDIO_CONTINUE _UFFDIO_POISON _UFFDIO_API
UFFDIO_REGISTER_MODE_MISSING UFFDIO_REGISTER_MODE_WP UFFDIO_REGISTER_MODE_MINOR
UFFDIO_COPY_MODE_DONTWAKE UFFDIO_COPY_MODE_WP UFFDIO_ZEROPAGE_MODE_DONTWAKE
UFFDIO_WRITEPROTECT_MODE_WP UFFDIO_WRITEPROTECT_MODE_DONTWAKE
UFFDIO_CONTINUE_MODE_DONTWAKE UFFDIO_CONTINUE_MODE_WP UFFDIO_POISON_MODE_DONTWAKE
PYHV_MCE_RECORDS PYHV_ENG_STATES PYHV_EV_READ_FAILED PYHV_EV_WORKER_GONE PYHV_EV_CHAN_CLOSED
PYHV_EV_WORKER_FORKED PYHV_EV_WORKER_PID PYHV_EV_PATH_LOST
""".split()


def _cdef() -> str:
    header = (HERE / "pyhv.h").read_text()
    body = header.split("#include <stddef.h>", 1)[1].rsplit("#endif", 1)[0]
    defines = "".join(f"#define {name} ...\n" for name in CONSTANTS)
    return defines + body


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "pyhv._core",
    '#include "uffd_compat.h"\n#include "pyhv.h"\n',
    sources=[str((HERE / s).relative_to(HERE.parent)) for s in SOURCES],
    include_dirs=[str(HERE.relative_to(HERE.parent)), *NBD_INCLUDES],
    define_macros=NBD_MACROS,
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
    libraries=["pthread", "z", *NBD_LIBS],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
