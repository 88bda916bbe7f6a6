"""leapserve.kernels."""
