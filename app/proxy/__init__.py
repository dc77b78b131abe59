"""The agent proxy: every method on `/apps/{applicationId}/agent/{path}` streamed to the
application's upstream, byte for byte, with the session bound to the conversation.

Contract, in request order:
- WebSocket upgrades: 501 `websocket_not_supported` (never half-proxied). TRACE, TRACK and
  CONNECT: 405 `method_not_allowed` (an upstream's echo would reveal the configured headers).
  Once open streams were told to stop (shutdown timeout passed): 503 `shutting_down`.
- The upstream URL is `{upstream}/{path}?{query}` from the *raw* request path. A segment that is
  `.`/`..` (also with path parameters: `..;x`), contains `/`, `\\`, `@` or a control character
  (after percent-decoding, repeatedly), or is empty (`//`), is 400 `invalid_path`: nothing in
  the request can reach another host or a path outside the upstream base.
- A declared `Content-Length` over the application's `max_body_bytes` is 413 `body_too_large`
  before the upstream is contacted; a chunked body is cut off (and 413) once it exceeds the cap.
  Bodies of a declared length up to `SMALL_BODY_BYTES` (64 KiB) are read first and sent with
  that length; larger or chunked bodies stream upstream, they are never buffered whole.
- Upstream capacity (app/capacity.py): a slot of the application, of the client address and
  of the process is taken before the session is loaded, one of the session once its id is
  known; a full one is 503 `upstream_busy` (`Retry-After`) at once, nothing sent upstream.
  The slots are returned when the exchange ends, however it ends.
- The session is loaded (which slides its TTL), then the application's rate limits are checked
  (429 `rate_limited`, see `app.ratelimit`). The first agent request of a session mints the
  conversation id (`gw.conversation_id`, random, unrelated to the session id) and creates the
  session; the session is saved *before* the upstream is contacted and before the response
  starts, so a streaming response can never lose it or its cookie.
- An upstream response with `X-Session-Rotate: 1` rotates the session id (new id, same data and
  conversation, old id deleted) before the response starts; the header is not relayed.
- Upstream request headers: see `upstream_request_headers`. Response headers: see
  `browser_response_headers` (every relayed answer is inert in the browser: `PROXIED_CSP`).
  Redirects are not followed; every final status (200-599) passes through. Any other status
  (`101 Switching Protocols` in particular) is 502 `upstream_protocol_error`.
- Upstream refused/unreachable: 502 `upstream_unavailable`. No response headers within
  `connect_timeout_seconds`: 504 `upstream_timeout`. The timer counts from the start of the
  upstream request (a pooled connection included) but is paused while the gateway waits for
  the browser's body bytes: it restarts after each chunk was passed on, so after the whole
  body. A browser body that pauses longer than `BODY_TIMEOUT_SECONDS`, or is not complete
  `UPLOAD_TIMEOUT_SECONDS` (or the application's `upload_timeout_seconds`) after the request
  got here, before the upstream answered: 408 `body_timeout`. An answer
  that is not valid HTTP (status line, framing, header limits, a control character in a
  header): 502 `upstream_protocol_error`.
- Streaming: chunks are relayed as they arrive (bounded reads; `await write()` applies the
  browser's backpressure to the upstream read). Event streams get SSE comment keep-alives after
  `SSE_KEEPALIVE_SECONDS` of upstream silence, but only between events and only while the
  browser is reading (the transport is not above its high-water mark).
- Failure after the response started (upstream reset or truncated body, no bytes for
  `idle_timeout_seconds`, shutdown timeout): an event stream that stands between two events gets
  one `event: error` (`data: {"code": ..., "message": ..., "request_id": ...}`) and closes; any
  other response (or an event stream cut mid-event, where an injected event would be corrupt)
  is aborted, so the browser sees a truncated body, never a clean end.
- The browser disconnecting cancels the upstream request within `DISCONNECT_POLL_SECONDS`, also
  while the upstream is silent (`web.run_app` does not cancel handlers on disconnect, so the
  transport is watched here). A browser that accepts no byte of a waiting answer for
  `idle_timeout_seconds` counts as gone: its connection is aborted (see `DisconnectWatch`).

The package, one concern per module:
- `handler`: `agent_proxy`, the steps above in order (the route's only entry point), and
  `render`, the one place a refusal becomes the JSON envelope.
- `errors`: one exception type per error code the proxy answers with.
- `urls`: the upstream URL from the raw path; whether a redirect leaves the application.
- `header_policy`: which headers cross, per direction (allowlists over floors, APPS_FILE).
- `headers`: the headers sent upstream and relayed to the browser, and the checks on both.
- `exchange`: one request in flight (`Exchange`) and the browser's body streamed upstream.
- `call`: the upstream call, an async context manager that raises typed errors.
- `relay`: the answer streamed to the browser; keep-alives; failures after the start.
- `watch`: the browser's disconnect (and a browser that reads nothing) noticed, no task.
- `fastread`: aiohttp's private internals, fenced (the relay's buffered reads).
"""
