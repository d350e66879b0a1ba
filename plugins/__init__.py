"""AiiDA plugins of polmodel: data types, CalcJobs, parsers."""
