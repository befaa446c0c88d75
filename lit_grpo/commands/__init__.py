"""Commands beside the Lightning ones; each module has `main(argv) -> int` and a `HELP` line."""
