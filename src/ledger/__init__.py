"""The inventory ledger's domain: aggregates, events, commands, the Application and its writer.

Pure code: nothing here logs, reads the clock or the environment, or imports a
database driver, web framework or HTTP client. Time comes in with commands.
"""
