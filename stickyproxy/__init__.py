"""stickyproxy: a reverse proxy for session-based web apps, built around sticky routing."""

__version__ = "0.1.0"
