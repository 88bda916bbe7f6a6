"""leapserve.server."""
