"""Resumable agent streams: runs that survive their browser and resume on any replica
(docs/resumable-streams.md). `sse` parses and frames events, `log` holds a run's events in
this process, `store` keeps them in Redis, `writer` sends them there, `runs` pumps them,
`readers` caps and feeds the resume readers, `http` serves them, `collector` exports their
counters, `wiring` builds it all into the application."""
