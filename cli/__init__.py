"""Command-line interface (`rdfast ...`): parse, validate, call the library, print."""
