"""pyhv: real paging of Linux process memory by a user-space hypervisor.

Workers call :func:`attach` to map their partition's memory (or
:func:`array` for a numpy view of it), :func:`discard` to give pages back,
:func:`prefetch` to have a range read ahead; everything else is the ``pyhv``
command line (:mod:`pyhv.cli`).
"""

from pyhv.arrays import array
from pyhv.attach import (EXIT_HYPERVISOR_LOST, AttachError, Memory, attach, detach, discard,
                         memory, on_pressure, prefetch)  # fmt: skip

__all__ = ["attach", "detach", "memory", "array", "discard", "prefetch", "on_pressure", "Memory",
           "AttachError", "EXIT_HYPERVISOR_LOST"]  # fmt: skip
__version__ = "0.1.0"
