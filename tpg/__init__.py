"""tpg: put the Trajectory Policy Gradient Theorem to the test on problems with known token rewards."""

__version__ = "0.1.0"
