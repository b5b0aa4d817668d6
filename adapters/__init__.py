"""Bundled adapters. Each module is an ordinary plugin written against the public API
(``quiesce.hookimpl``, ``Target``, ``Hold``, the errors) and imports its driver only
inside hooks, so a missing driver affects only the targets of that kind."""
