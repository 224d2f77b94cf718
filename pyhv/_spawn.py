"""How pyhv starts its own Python programs as child processes.

``python -m pyhv.X`` puts the child's current directory first on its import
path, so that from inside a source checkout (whose ``pyhv/`` has no built C
core) a child of an installed pyhv would import the checkout's copy instead.
``-P`` (Python 3.11) leaves the current directory out: the child imports the
pyhv its parent imported, from whatever directory it runs in.
"""

from __future__ import annotations

import sys


def module_command(module: str, *args: str) -> list[str]:
    """argv that runs ``python -m module args...`` with this interpreter."""
    return [sys.executable, "-P", "-m", module, *args]
