"""Users, the audit trail and retention."""
