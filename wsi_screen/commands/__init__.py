"""One module per CLI command. Modules here import only click and light helpers at module level."""
