"""Browser sessions: an aiohttp-session storage over a memory or Redis backend."""
