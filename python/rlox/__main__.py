"""``python -m rlox``: the rlox command line (see ``rlox --help``)."""

from rlox.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
