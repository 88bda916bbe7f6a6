"""leapserve.cli: the `leapserve` command (`serve`, `bench`, `train`); `python -m leapserve.cli` runs it too.

Before anything loads torch (and with it OpenMP), a short OpenMP spin: threads that spin-wait between parallel
regions for the default 300,000 iterations keep a CPU's cores busy, and on a machine shared with another busy
process each waits for a descheduled sibling, slowing every step 20x or more (docs/cli.md, BENCHMARKS.md). An
explicit GOMP_SPINCOUNT is kept.
"""

import os

OMP_SPIN_COUNT = "2000"

os.environ.setdefault("GOMP_SPINCOUNT", OMP_SPIN_COUNT)
