"""Kernel dispatch (placeholder, filled by the connector work)."""
