"""``python -m fedpers.gpu_check``: the entry point users and ``scripts/gpu_check.sh`` call; the check
itself lives in :mod:`fedpers.bench.gpu_check`."""

import sys

from fedpers.bench.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
