"""Inference jobs built on a model and its tokenizer: used by the CLI and the server."""
