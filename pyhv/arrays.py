"""numpy arrays over a partition's memory (numpy is optional: ``pyhv[numpy]``).

An array made here is a view: its elements are the partition's memory, so
its pages fault through the hypervisor, are shared with the partition's
other workers, and outlive this process.  While an array is alive the
memory cannot be detached (the mapping must outlive every view of it).
"""

from __future__ import annotations

import math
import operator

from pyhv.attach import Memory, memory


def array(shape, dtype="uint8", offset: int = 0, *, partition: str | None = None,
          run_dir: str | None = None, mem: Memory | None = None):  # fmt: skip
    """A numpy array of `shape` and `dtype` over the partition's memory,
    starting `offset` bytes into it (attaching first if this process has
    not).  ValueError if it would not fit or `offset` is not a multiple of
    the dtype's alignment; TypeError for a shape or offset that is no int."""
    try:
        import numpy as np
    except ImportError:
        raise ImportError("pyhv.array needs numpy: pip install 'pyhv[numpy]'") from None
    dt = np.dtype(dtype)
    try:
        dims = (operator.index(shape),) if not isinstance(shape, (tuple, list)) else tuple(
            operator.index(d) for d in shape)  # fmt: skip
        offset = operator.index(offset)
    except TypeError:
        raise TypeError(f"pyhv.array: shape {shape!r} and offset {offset!r} must be ints") from None
    if any(d < 0 for d in dims) or offset < 0:
        raise ValueError(f"pyhv.array: negative shape {dims} or offset {offset}")
    if offset % dt.alignment:
        raise ValueError(f"pyhv.array: offset {offset} is not a multiple of {dt.name}'s "
                         f"alignment ({dt.alignment} bytes)")  # fmt: skip
    mem = mem if mem is not None else memory(partition, run_dir)
    nbytes = math.prod(dims) * dt.itemsize
    if offset + nbytes > len(mem):
        raise ValueError(f"pyhv.array: {nbytes} bytes at offset {offset} do not fit in the "
                         f"partition's memory ({len(mem)} bytes)")  # fmt: skip
    return np.ndarray(dims, dtype=dt, buffer=mem, offset=offset)
