"""The benchmark scripts, a package so that the tests import them (``from benchmarks import common``); each script
still runs as ``python benchmarks/<script>.py``."""
