"""peftops microbenchmarks: ``python -m bench`` (see bench/harness.py)."""
