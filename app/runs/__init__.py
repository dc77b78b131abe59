"""Resumable agent streams: runs that survive their browser and resume on any replica
(docs/resumable-streams.md). `sse` parses and frames events, `log` holds a run's events in
this process, `store` keeps them in Redis, `runs` pumps them, `http` serves them."""
