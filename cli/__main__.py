"""``python -m cli``: the same as ``slimstream``."""

from cli.main import main

main()
