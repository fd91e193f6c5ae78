"""The node agent: `podagent node` on each GPU server (docs/node.md)."""
