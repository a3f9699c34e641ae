"""The HTTP API, the CLI, the settings and the composition root that wires the ledger."""
