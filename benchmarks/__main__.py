"""``python -m benchmarks``: the peak harness (see benchmarks/README.md)."""

import sys

from benchmarks.harness import main

sys.exit(main())
