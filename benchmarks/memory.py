"""Peak extra resident memory of one call, measured by the kernel (Linux VmHWM).

torch's CPU allocator keeps no statistics, so the process's peak RSS is reset
(/proc/self/clear_refs <- 5) before the call and read back after it. Only for glibc on Linux.
"""

import ctypes
import gc

# Large blocks are mmapped and unmapped on free, so what a call allocates shows in its RSS:
# setting the threshold also stops glibc from raising it and serving them from the kept heap.
_M_MMAP_THRESHOLD = -3
ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 64 * 1024)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mib(fn, *args, **kwargs):
    """MiB of resident memory the call added at its peak, above what was resident before it."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    result = fn(*args, **kwargs)
    peak = _status_kib("VmHWM")
    del result
    return max(0, peak - before) / 1024
