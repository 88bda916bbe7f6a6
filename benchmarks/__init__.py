"""leapserve.benchmarks."""
