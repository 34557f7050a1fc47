"""What goes back to the PACS: report content, the Structured Report, the secondary-capture page."""
