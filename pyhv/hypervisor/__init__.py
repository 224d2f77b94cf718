"""The hypervisor: one daemon per system (``python -m pyhv.daemon``).

Its rooms are this package's modules; pyhv.hypervisor.daemon assembles
them and says which is which.
"""

from pyhv.hypervisor.daemon import CONTROL_SOCKET, LOG_FILE, PID_FILE, Hypervisor, main
from pyhv.hypervisor.machine_check import ERROR_LOG

__all__ = ["Hypervisor", "main", "CONTROL_SOCKET", "PID_FILE", "LOG_FILE", "ERROR_LOG"]
