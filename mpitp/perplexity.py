"""``python -m mpitp.perplexity``: an alias of ``mpitp.cli.perplexity``, where the command lives."""

from .cli.perplexity import main

if __name__ == "__main__":
    raise SystemExit(main())
