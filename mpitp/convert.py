"""``python -m mpitp.convert``: an alias of ``mpitp.tools.convert``, where the command lives."""

from .tools.convert import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
