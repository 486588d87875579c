"""The longside server: an OpenAI-compatible HTTP API where every user has a persistent long-term memory."""
