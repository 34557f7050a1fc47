"""The ``ketanode`` command: one module per command group."""
