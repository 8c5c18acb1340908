"""Privacy of the round's updates: secure aggregation (the ServerApp sees only the sum) and
differential privacy (the sum carries calibrated Gaussian noise)."""
