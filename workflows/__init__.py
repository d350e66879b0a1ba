"""AiiDA workchains of polmodel."""
