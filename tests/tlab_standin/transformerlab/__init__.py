"""STAND-IN for the `transformerlab` package TransformerLab's plugin harness provides (tests only)."""
