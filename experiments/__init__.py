"""Example clients of broker and bifrost: they use only the two packages' public APIs."""
