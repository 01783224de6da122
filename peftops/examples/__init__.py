"""End-to-end examples on real models that ship in PyPI packages (run each with ``python -m peftops.examples.<name>``)."""
