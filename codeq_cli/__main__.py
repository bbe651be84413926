"""``python -m codeq_cli`` runs the CLI (torchrun launches it this way)."""

from codeq_cli.cli.app import main

if __name__ == "__main__":
    main()
