"""Metrics and reports: candidate-set ranking, retrieval, pair verification."""
