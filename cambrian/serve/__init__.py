"""Serving: command-line chat now; HTTP and web UI come with the serving issue."""
