"""Supplier connectors: adapters, parsers, normalisation, scheduler and dead letters."""
