"""Trainers: each registered once in ``registry.py``; per trainer, a spec module (what a job
may ask, torch-free: ``lm_spec``, ``digits_spec``) and its training code (``lm``, ``digits``)."""
