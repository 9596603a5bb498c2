"""`python -m services.cli` is the `coinstore` command."""

from services.cli.main import main

main()
