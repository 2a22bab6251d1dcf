"""DNS: resource-name patterns (and, next to them, the client's split-DNS stub)."""
