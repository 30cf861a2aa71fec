"""`python -m benchmarks`: run every benchmark."""

from __future__ import annotations

import sys

from benchmarks import bench_activation, bench_boot, bench_flood, bench_proxy

if __name__ == "__main__":
    status = bench_activation.main(sys.argv[1:])
    print(flush=True)
    # The arguments are bench_activation's; `python -m benchmarks.bench_boot --help` has its own.
    status = bench_boot.main([]) or status
    print(flush=True)
    status = bench_proxy.main([]) or status
    print(flush=True)
    status = bench_flood.main([]) or status
    sys.exit(status)
