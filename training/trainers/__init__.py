"""Trainers: one module per registered trainer (``lm``, ``digits``)."""
