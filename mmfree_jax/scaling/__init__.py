"""Scaling-law research: sweep outputs (`results`), law fitting (`fit`), figures (`plots`)
and the report CLI (`report`)."""
