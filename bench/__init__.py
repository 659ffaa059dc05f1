"""The benchmark, outside the mpitp package: run ``mpirun -n P python -m bench`` from a clone's root.

``__main__`` runs it; ``models`` builds the random-weight presets, ``timing`` times the model, ``ceilings``
measures and predicts what bounds it, ``record`` makes the JSON record of a run, ``report`` prints it,
``environment`` says where it ran and how busy the machine was; ``summary``, ``plots`` and ``cluster`` make the
tables and plots of several records. ``memory.py`` is a separate script.
Every bench tool names its errors ``bench: error: ...``, usage errors included (``BenchParser``).
"""

import sys

from mpitp.cli.runner import RankParser

PROG = "bench"


class BenchParser(RankParser):
    """The bench tools' argument parser: a usage error reads ``bench: error: ...`` like every other error of
    the bench (argparse would name the ``prog`` of the usage line, e.g. ``python -m bench``)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")
