"""leapserve.drafters."""
