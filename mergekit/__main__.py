"""``python -m mergekit``: the same as the ``mergekit`` command."""

from .cli import main

main()
