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
