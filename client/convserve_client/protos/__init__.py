"""Python code generated from ``proto/`` by ``make proto``; do not edit by hand."""
