"""Test support shipped with the package: the literal transcription of the method used as the oracle."""
