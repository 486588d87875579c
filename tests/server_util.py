"""The server tests start real servers with `longside.server.process.running_server`."""

from longside.server.process import Server, running_server  # noqa: F401
