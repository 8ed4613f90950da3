"""What every stage shares: errors, the configuration, metrics, logging."""
