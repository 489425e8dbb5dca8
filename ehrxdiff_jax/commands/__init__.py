"""One module per `ehrxdiff` subcommand: `add_arguments(parser)` and `run(args) -> int`."""
