"""`python -m chiptune_forge` runs the command-line tool."""

from .cli import run

run()
