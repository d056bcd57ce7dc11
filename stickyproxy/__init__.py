"""stickyproxy: a reverse proxy for session-based apps, built around sticky routing."""

__version__ = "0.1.0"
