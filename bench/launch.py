"""`python bench/launch.py OUT ARGV...`: runs ARGV, then writes its wall time, peak RSS and exit code to OUT (JSON).

Linux carries a process's peak RSS across exec, so a command started straight from the benchmark
process (which holds JAX and a large copy buffer) would report at least the benchmark's own peak.
Started from this small process, it reports its own. Standard library only, to stay small.
"""

import json
import os
import subprocess
import sys
import time

if __name__ == "__main__":
    out, argv = sys.argv[1], sys.argv[2:]
    start = time.perf_counter()
    process = subprocess.Popen(argv)
    _, status, usage = os.wait4(process.pid, 0)  # the rusage of exactly this child
    maxrss_unit = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    with open(out, "w") as handle:
        json.dump({"wall_s": time.perf_counter() - start, "peak_rss_bytes": usage.ru_maxrss * maxrss_unit,
                   "returncode": os.waitstatus_to_exitcode(status)}, handle)
