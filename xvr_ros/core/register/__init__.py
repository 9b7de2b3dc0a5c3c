"""Intraoperative registration: similarity, refinement, the registration entry point."""
