"""`python -m consortium ...` runs the CLI (how local clusters start their processes)."""

from consortium.cli.main import main

main()
