"""The `fusenet` command line: one `main`, one error handler, a module per command group."""
from engine.cli.main import main

__all__ = ["main"]
