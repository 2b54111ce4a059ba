"""lmforge.optim."""
