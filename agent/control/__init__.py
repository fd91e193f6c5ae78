"""The local control API (Unix socket) and podctl, the technician's client."""
