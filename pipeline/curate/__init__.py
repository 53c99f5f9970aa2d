"""Curation: keep the rarest samples of a run (the filter) and publish scheduled versions (the refresh)."""
