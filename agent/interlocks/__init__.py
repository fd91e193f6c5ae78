"""Local safety interlocks: a pure engine (engine.py), actuation (actuate.py), the service gluing them
to the state store (service.py), and the audit log (audit.py)."""
