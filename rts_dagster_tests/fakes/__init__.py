"""Local stand-ins for outside services, driven by the real client libraries in tests."""
