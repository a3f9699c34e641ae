"""Read models built from the InventoryLedger event log, their runner, rebuilds and audit reads."""
