"""leapserve.cli: the `leapserve` command (`serve`, `bench`, `train`); `python -m leapserve.cli` runs it too."""
