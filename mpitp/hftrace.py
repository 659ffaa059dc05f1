"""``python -m mpitp.hftrace``: an alias of ``mpitp.tools.hftrace``, where the command lives."""

from .tools.hftrace import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
