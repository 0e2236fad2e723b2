"""Prefect tasks: thin, typed wrappers that do I/O and call one library function each.

Tasks exchange paths, content hashes and small config objects, never models or tensors. A
stage's task writes into a directory named by a key over its inputs' content, config sections and
library code version, and skips the work when that directory is complete: how the key is made and
what invalidates it is said once, in tasks/common.py.
"""
