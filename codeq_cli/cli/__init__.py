"""The ``codeq`` command: the Typer app (:mod:`.app`) and terminal output (:mod:`.console`)."""
