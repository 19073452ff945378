"""Synthetic tasks that isolate one ability of a sequence mixer (recall: ``mqar``)."""
