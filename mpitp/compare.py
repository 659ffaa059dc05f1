"""``python -m mpitp.compare``: an alias of ``mpitp.tools.compare``, where the command lives."""

from .tools.compare import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
