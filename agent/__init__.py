"""podagent: the edge agent that keeps a modular AI data-center pod safe and reports on it."""

__version__ = "0.1.0"
