"""Command-line entry points: argument parsing, handing over to the package that does the work."""
