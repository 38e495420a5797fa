"""``python -m smoothguide`` runs the ``smoothguide`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
