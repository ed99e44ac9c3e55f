"""Training pieces shared by all parties: optimizer settings and the loss."""
