"""`python -m benchmarks`: run every benchmark."""

from __future__ import annotations

import sys

from benchmarks import bench_activation

if __name__ == "__main__":
    sys.exit(bench_activation.main(sys.argv[1:]))
