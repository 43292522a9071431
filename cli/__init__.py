"""The `llamagen` command line: the top layer."""

import sys

from engine.openmp import set_openmp_defaults

if sys.argv[1:2] == ["serve"]:
    # libgomp reads its settings when torch loads it, which importing the CLI does, and
    # vLLM forks the engine processes from this one: the server's must be set first.
    set_openmp_defaults()
