"""Autoscaling (issue 14): the decision, a pure function of observed signals (``policy``)."""
