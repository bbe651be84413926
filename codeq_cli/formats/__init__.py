"""What codeq writes and reads back: entropy coding, the compressed checkpoint, the run state, export."""
