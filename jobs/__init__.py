"""Entry points: each parses arguments, builds a config and calls one library function."""
