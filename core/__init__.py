"""What every layer shares: the error taxonomy, the entry-point wrapper and atomic file writes."""
