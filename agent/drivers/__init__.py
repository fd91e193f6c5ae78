"""Drivers know protocols, never policy. One module per protocol, registered by kind."""
