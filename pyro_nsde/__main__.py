"""``python -m pyro_nsde``: the command line (see :mod:`pyro_nsde.app.cli`)."""

from .app.cli import main

if __name__ == "__main__":
    main()
