"""`python -m leapserve.server` runs the `leapserve` command line."""
from .cli import main

main()
