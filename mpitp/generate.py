"""``python -m mpitp.generate``: an alias of ``mpitp.cli.generate``, where the command lives."""

from .cli.generate import DEFAULT_MODEL, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
