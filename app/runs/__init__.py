"""Resumable agent streams: runs that survive their browser and resume on any replica
(docs/resumable-streams.md). `sse` parses and frames events, `log` holds a run's events in
this process, `store` keeps them in Redis (as `entries`, with its Lua `scripts`; `catchup`
gates its catch-up reads, `budget` counts each application's bytes there), `writer` sends
them there, `runs` pumps them, `readers` caps the resume readers and follows runs pumped
elsewhere, `feed` streams a run to one browser, `http` serves the endpoints, `collector`
exports the counters, `wiring` builds it all into the application."""
