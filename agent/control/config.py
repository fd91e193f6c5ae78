"""The [control] section: the local control socket that podctl talks to.

The socket's path is ``[paths] socket``; this section says who may do what on it.
"""

from __future__ import annotations

from pydantic import Field

from agent.config_base import Strict


class ControlConfig(Strict):
    enabled: bool = True
    # Members (primary or supplementary) of this group, and root, may change things: ack, override,
    # override clear, poll now, reload. Everyone who can open the socket may read.
    admin_group: str = Field("podagent-admin", min_length=1)
    # The socket file gets this group (mode 0660) when the group exists, so its members can read.
    read_group: str = Field("podagent", min_length=1)
    # One request is one JSON line; anything longer is refused and the connection closed.
    max_request_bytes: int = Field(65536, ge=256, le=16 * 1024 * 1024)
    # Bounds: a local client, however hostile, costs the daemon a bounded share of its time,
    # memory and file descriptors (the unit's LimitNOFILE is far above these).
    max_connections: int = Field(256, ge=1, le=100_000)
    max_connections_per_uid: int = Field(32, ge=1, le=100_000)
    # Unsent bytes per connection: past this a client that does not read is dropped, not waited
    # for (after drain_timeout_s), follow streams included.
    max_write_buffer_bytes: int = Field(256 * 1024, ge=4096, le=64 * 1024 * 1024)
    drain_timeout_s: float = Field(2.0, gt=0, le=60)
    max_json_depth: int = Field(16, ge=2, le=100)
    # Refused requests (permission denied) per uid: answered at this rate, then cut off (the
    # connection closed); audited as a counter plus one sampled event per interval.
    refused_per_s: float = Field(5.0, gt=0)
    refused_burst: int = Field(20, ge=1)
    refused_event_interval_s: float = Field(60.0, gt=0)
