"""`python -m deployd`."""

from .cli import main

main()
