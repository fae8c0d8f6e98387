"""The redpool benchmark suite: `make bench` (or `python -m bench.run --help`)."""
