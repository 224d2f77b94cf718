"""Entry point of the hypervisor process (``python -m pyhv.daemon``).

A module of its own so that :mod:`pyhv.hypervisor` is imported under its own
name, never run as ``__main__`` (its classes would exist twice).
"""

import sys

from pyhv.hypervisor import main

sys.exit(main())
