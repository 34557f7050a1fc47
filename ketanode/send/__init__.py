"""What goes out: C-STORE to the PACS, and the dispatcher that retries it."""
