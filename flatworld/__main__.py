"""`python -m flatworld ...`: the same command line as `flatworld ...`."""

from flatworld.cli import main

main()
