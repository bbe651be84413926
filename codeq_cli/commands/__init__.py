"""The pipelines behind the CLI: compress, eval, report, batch, demo. They never print; they emit events."""
