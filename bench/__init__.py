"""The benchmark, outside the mpitp package: run ``mpirun -n P python -m bench`` from a clone's root.

``__main__`` runs it; ``models`` builds the random-weight presets, ``timing`` times the model, ``ceilings``
measures and predicts what bounds it, ``report`` prints and records it. ``memory.py`` is a separate script.
"""
