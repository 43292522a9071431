"""The `llamagen` command line: the top layer."""
