"""pyhv: real paging of Linux process memory by a user-space hypervisor.

Workers call :func:`attach` to map their partition's memory; everything else
is the ``pyhv`` command line (:mod:`pyhv.cli`).
"""

from pyhv.attach import EXIT_HYPERVISOR_LOST, AttachError, attach, detach

__all__ = ["attach", "detach", "AttachError", "EXIT_HYPERVISOR_LOST"]
__version__ = "0.1.0"
