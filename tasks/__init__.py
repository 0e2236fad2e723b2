"""Prefect tasks: thin, typed wrappers that do I/O and call one library function each.

Tasks exchange paths, content hashes and small config objects, never models or tensors, so
Prefect can hash their inputs into cache keys. Cached tasks take a `code` argument (the
version of the library code they call) because Prefect's TASK_SOURCE sees only the task body.
"""
