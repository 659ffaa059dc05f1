"""Refusing requests that would exhaust memory, before allocating anything.

Large NumPy allocations succeed lazily and fail later, somewhere in the middle of a forward (or the kernel's
out-of-memory killer ends one rank and the others wait). So the weights of a shard and a KV cache are
checked against the memory this machine has available first.
"""

import os

from .errors import RequestError


def available_bytes():
    """Memory available to new allocations on this machine (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def rss_bytes(field="VmRSS"):
    """This process's resident memory now (``VmRSS``) or its peak (``VmHWM``) in bytes; None if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(nbytes, what, hint):
    """Raise ``RequestError`` if ``nbytes`` more bytes cannot fit in the available memory."""
    free = available_bytes()
    if free is not None and nbytes > free:
        raise RequestError(f"{what} needs {nbytes / 2**30:.2f} GiB but this machine has {free / 2**30:.2f} GiB "
                           f"available; {hint}.")
