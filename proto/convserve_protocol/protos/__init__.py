"""Python code generated from ``proto/*.proto`` by ``make proto``; do not edit by hand."""
