"""The ``partition-model`` command line: every entry point, one table, one error handler."""
