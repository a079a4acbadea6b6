"""Cambrian model package."""
