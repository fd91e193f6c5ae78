"""Publishers read the state store and never block polling or interlocks."""
