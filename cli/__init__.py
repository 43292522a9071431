"""The `llamagen` command line: the top layer."""

from engine.openmp import set_openmp_defaults

set_openmp_defaults()  # before anything imports torch (and with it libgomp)
