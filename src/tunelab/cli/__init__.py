"""The `tunelab` command: the only place that parses argv."""
