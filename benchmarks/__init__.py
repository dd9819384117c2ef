"""One module per benchmark (`python -m benchmarks.NAME`); each prints one JSON line last."""
