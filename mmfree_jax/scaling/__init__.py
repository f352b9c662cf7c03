"""Scaling-law research: FLOP accounting (`flops`), sweep outputs (`results`), law fitting
(`fit`), figures (`plots`), the report CLI (`report`) and an offline corpus (`corpus`)."""
