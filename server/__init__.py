"""leapserve.server."""

DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20  # `--max-request-bytes`: larger bodies get a 413
