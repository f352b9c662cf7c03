"""Scaling-law research: sweep outputs (`results`), law fitting (`fit`), its application to a
results table (`analysis`), figures (`plots`) and the report CLI (`report`)."""
