"""agent-bff: an aiohttp gateway between browser frontends and AI-agent services."""

__version__ = "0.1.0"
