"""The package version, on the ground floor so that modules that record it import nothing above them."""

__version__ = "0.1.0"
