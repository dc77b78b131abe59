"""Typed application keys: what the wiring (`main.create_app`) shares with handlers."""

from __future__ import annotations

from aiohttp import web

from app.config import Settings
from app.sessions.backend import SessionBackend
from app.sessions.storage import SessionStorage

SETTINGS_KEY = web.AppKey("settings", Settings)
BACKEND_KEY = web.AppKey("session_backend", SessionBackend)
STORAGE_APP_KEY = web.AppKey("session_storage", SessionStorage)
