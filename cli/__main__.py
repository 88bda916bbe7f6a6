"""`python -m leapserve.cli`: the `leapserve` command."""

import sys

from .main import main

sys.exit(main())
