"""Small shared utilities (atomic file writes, logging, devices)."""
